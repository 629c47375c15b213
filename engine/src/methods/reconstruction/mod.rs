//! The reconstruction family: a model learns to reproduce normal data and anomalies are what it cannot
//! reproduce.

family_methods!(autoencoder, stfpm, dfr, reverse_distillation);
