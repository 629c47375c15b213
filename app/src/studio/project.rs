//! The project file lives in the engine (`loupe_engine::project`): it is a file format with an untrusted
//! parser, fuzzed without the GUI. Re-exported here, where the studio's code reaches it.

pub use loupe_engine::project::*;
