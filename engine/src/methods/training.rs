//! Training shared by every method that learns parameters (the flows, the reconstruction, augmentation and
//! one-class methods): AdamW over a VarMap with progress notes, cancel and a time budget that keep the best
//! epoch's parameters, and the VarMap ⇄ model-file conversions.

use crate::progress::Progress;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use std::collections::HashMap;
use std::time::Instant;

/// The settings every trained method shares, flattened into its settings (the keys stay `epochs`,
/// `learning_rate`, … at the top level of the JSON the user and the model file give).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub epochs: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Stop starting epochs after this many seconds and keep the best (0: train every epoch).
    pub time_budget_seconds: f64,
    pub seed: u64,
    /// AdamW's β₁, the decay of its running mean of gradients. Files saved before it existed trained with 0.9.
    #[serde(default = "adam_beta1_default")]
    pub adam_beta1: f64,
    /// The learning rate falls along a half cosine from `learning_rate` to this share of it at the last step
    /// (1: constant, as files saved before it existed trained).
    #[serde(default = "final_learning_rate_share_default")]
    pub final_learning_rate_share: f64,
}

const fn adam_beta1_default() -> f64 {
    0.9
}

const fn final_learning_rate_share_default() -> f64 {
    1.0
}

impl Schedule {
    /// `epochs` at `learning_rate`, weight decay 1e-5, no time budget, seed 0, AdamW's usual β₁ = 0.9: every
    /// method's default but those.
    pub const fn new(epochs: usize, learning_rate: f64) -> Self {
        Self {
            epochs,
            learning_rate,
            weight_decay: 1e-5,
            time_budget_seconds: 0.0,
            seed: 0,
            adam_beta1: adam_beta1_default(),
            final_learning_rate_share: final_learning_rate_share_default(),
        }
    }

    /// The same schedule with `epochs` and `learning_rate` (the presets' usual change).
    pub const fn with(self, epochs: usize, learning_rate: f64) -> Self {
        Self { epochs, learning_rate, ..self }
    }

    /// The plan of `steps_per_epoch` steps an epoch.
    pub fn plan(&self, steps_per_epoch: usize) -> TrainingPlan {
        TrainingPlan {
            epochs: self.epochs,
            steps_per_epoch,
            learning_rate: self.learning_rate,
            weight_decay: self.weight_decay,
            adam_beta1: self.adam_beta1,
            final_learning_rate_share: self.final_learning_rate_share,
            time_budget_seconds: self.time_budget_seconds,
            seed: self.seed,
        }
    }
}

/// How a method trains.
#[derive(Debug, Clone)]
pub struct TrainingPlan {
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    /// See [`Schedule::final_learning_rate_share`].
    pub final_learning_rate_share: f64,
    /// Stop starting new epochs after this many seconds (0: no limit).
    pub time_budget_seconds: f64,
    /// Draws the networks' initial weights ([`seed_initial_weights`]).
    pub seed: u64,
}

impl TrainingPlan {
    /// The learning rate of step `step` (counted over all epochs): a half cosine from `learning_rate` at the
    /// first step to `learning_rate · final_learning_rate_share` at the last, the decay of SGDR / timm's cosine
    /// scheduler without restarts. A time budget that stops early leaves the later, smaller rates unused.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let last = (self.epochs * self.steps_per_epoch).saturating_sub(1).max(1);
        let progress = (step.min(last) as f64) / last as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let share = self.final_learning_rate_share;
        self.learning_rate * (share + (1.0 - share) * cosine)
    }
}

/// What happened during training.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TrainingRecord {
    /// Mean loss of each finished epoch.
    pub epoch_losses: Vec<f64>,
    /// The epoch whose parameters were kept (the lowest mean loss).
    pub best_epoch: usize,
    pub stopped_early: Option<String>,
}

fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("parameter store poisoned"))?;
    data.iter().map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?))).collect()
}

fn restore(varmap: &VarMap, saved: &HashMap<String, Tensor>) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("parameter store poisoned"))?;
    for (name, var) in data.iter() {
        if let Some(tensor) = saved.get(name) {
            var.set(tensor)?;
        }
    }
    Ok(())
}

/// The optimizer every trained method uses (β₁ from the schedule, 0.9 unless a method says otherwise; β₂ =
/// 0.999; ε = 1e-8).
fn adamw(varmap: &VarMap, learning_rate: f64, weight_decay: f64, beta1: f64) -> Result<candle_nn::AdamW> {
    Ok(candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW { lr: learning_rate, weight_decay, beta1, ..Default::default() },
    )?)
}

/// One method's training step, set up on a synthetic batch so that it can be timed alone (`loupe bench
/// train-step`): the method's own network, loss and optimizer settings.
pub struct BenchStep {
    pub varmap: VarMap,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// The loss of the batch, built afresh (forward included) at each call.
    pub loss: Box<dyn FnMut() -> Result<Tensor>>,
    /// What was set up, e.g. "batch 16, 64² input".
    pub geometry: String,
}

/// The parts of one timed step, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    pub total: f64,
    pub forward_loss: f64,
    pub backward: f64,
    pub optimizer: f64,
}

/// Runs `warmup + steps` AdamW steps of `step` and returns the timings of the last `steps`, measured as the
/// PyTorch reference measures them (forward + loss, backward, optimizer update with the loss read back).
pub fn time_steps(step: &mut BenchStep, warmup: usize, steps: usize) -> Result<Vec<StepTiming>> {
    let mut optimizer = adamw(&step.varmap, step.learning_rate, step.weight_decay, adam_beta1_default())?;
    let mut timings = Vec::with_capacity(steps);
    for index in 0..warmup + steps {
        let started = Instant::now();
        let loss = (step.loss)()?;
        let after_forward = Instant::now();
        let gradients = loss.backward()?;
        let after_backward = Instant::now();
        optimizer.step(&gradients)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let done = Instant::now();
        if !value.is_finite() {
            bail!("the loss became {value} in step {}", index + 1);
        }
        if index >= warmup {
            let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1e3;
            timings.push(StepTiming {
                total: ms(started, done),
                forward_loss: ms(started, after_forward),
                backward: ms(after_forward, after_backward),
                optimizer: ms(after_backward, done),
            });
        }
    }
    Ok(timings)
}

/// The number of trained parameters.
pub fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|var| var.elem_count()).sum()
}

/// Minimises `loss(epoch, step)` with AdamW over the variables of `varmap`. Reports `loss <value>` notes per
/// epoch; when the user cancels (or the time budget ends) it stops and keeps the best epoch's parameters, so a
/// stopped run still yields a usable model.
pub fn train(
    varmap: &VarMap,
    plan: &TrainingPlan,
    progress: &dyn Progress,
    mut loss: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<TrainingRecord> {
    seed_initial_weights(varmap, plan.seed)?;
    let mut optimizer = adamw(varmap, plan.learning_rate, plan.weight_decay, plan.adam_beta1)?;
    let mut record = TrainingRecord::default();
    let mut best: Option<(f64, HashMap<String, Tensor>)> = None;
    let started = Instant::now();
    progress.begin("training", (plan.epochs * plan.steps_per_epoch) as u64);
    'epochs: for epoch in 0..plan.epochs {
        let mut total = 0.0;
        for step in 0..plan.steps_per_epoch {
            if progress.is_cancelled() {
                record.stopped_early = Some(format!("cancelled in epoch {}", epoch + 1));
                break 'epochs;
            }
            let value = loss(epoch, step)?;
            optimizer.set_learning_rate(plan.learning_rate_at(epoch * plan.steps_per_epoch + step));
            optimizer.backward_step(&value)?;
            // Read back as F32 and widened here: Metal has no F64, so a device tensor never becomes one.
            let scalar = value.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
            if !scalar.is_finite() {
                bail!("the training loss became {scalar} in epoch {} (lower the learning rate)", epoch + 1);
            }
            total += scalar;
            progress.advance(1);
        }
        let mean = total / plan.steps_per_epoch.max(1) as f64;
        record.epoch_losses.push(mean);
        progress.loss(epoch, plan.epochs, mean);
        if best.as_ref().is_none_or(|(b, _)| mean < *b) {
            best = Some((mean, snapshot(varmap)?));
            record.best_epoch = epoch;
        }
        if plan.time_budget_seconds > 0.0 && epoch + 1 < plan.epochs {
            let per_epoch = started.elapsed().as_secs_f64() / (epoch + 1) as f64;
            if started.elapsed().as_secs_f64() + per_epoch > plan.time_budget_seconds {
                record.stopped_early = Some(format!("time budget reached after epoch {}", epoch + 1));
                break;
            }
        }
    }
    match best {
        Some((_, saved)) => restore(varmap, &saved)?,
        None => bail!("training stopped before the first epoch finished: no model to keep"),
    }
    if let Some(reason) = &record.stopped_early {
        progress.note(&format!("stopped early ({reason}); kept epoch {}", record.best_epoch + 1));
    }
    Ok(record)
}

/// Redraws, from `seed`, every variable of `varmap` that `candle_nn::linear` drew at random — weights `(out, in)`
/// from N(0, 2/in) (Kaiming, as candle draws them), biases from U(−1/√in, 1/√in) — in name order. candle's CPU
/// generator cannot be seeded, so without this two fits with the same settings start from different weights
/// and end with different scores. Variables that hold one value everywhere (constant initialisers: zero
/// gammas, identity scales, zeroed output layers) keep it.
pub fn seed_initial_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().map_err(|_| anyhow::anyhow!("parameter store poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = crate::rng::SplitMix64::new(seed ^ 0x5eed_1a1e);
    for name in names {
        let var = &data[name];
        let fan_in_of = |weight: Option<&Var>| weight.filter(|w| w.rank() == 2).map(|w| w.dims()[1]);
        let (fan_in, is_weight) = if name.ends_with("weight") {
            (fan_in_of(Some(var)), true)
        } else if let Some(prefix) = name.strip_suffix("bias") {
            (fan_in_of(data.get(&format!("{prefix}weight"))), false)
        } else {
            (None, false)
        };
        let Some(fan_in) = fan_in else { continue };
        let values = var.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if values.iter().all(|&v| v == values[0]) {
            continue;
        }
        let redrawn: Vec<f32> = if is_weight {
            let std = (2.0 / fan_in as f64).sqrt() as f32;
            (0..values.len()).map(|_| rng.normal() * std).collect()
        } else {
            let bound = (1.0 / fan_in as f64).sqrt() as f32;
            (0..values.len()).map(|_| rng.range_f32(-bound, bound)).collect()
        };
        var.set(&Tensor::from_vec(redrawn, var.shape(), var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Every variable of `varmap` as named tensors on the CPU, for the model file.
pub fn varmap_state(varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let mut state: Vec<(String, Tensor)> =
        snapshot(varmap)?.into_iter().map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    state.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(state)
}

/// A VarMap holding exactly `tensors` (a loaded model), on `device`.
pub fn varmap_from(tensors: HashMap<String, Tensor>, device: &Device) -> Result<VarMap> {
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(|_| anyhow::anyhow!("parameter store poisoned"))?;
        for (name, tensor) in tensors {
            data.insert(name, Var::from_tensor(&tensor.to_device(device)?.to_dtype(DType::F32)?)?);
        }
    }
    Ok(varmap)
}

/// Checks that `tensors` are exactly the variables `build` creates (names and shapes), then loads them.
pub fn load_varmap(
    tensors: HashMap<String, Tensor>,
    device: &Device,
    method: &str,
    build: impl Fn(&VarBuilder) -> Result<()>,
) -> Result<VarMap> {
    let probe = VarMap::new();
    build(&VarBuilder::from_varmap(&probe, DType::F32, device))?;
    let expected: HashMap<String, Vec<usize>> = probe
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("parameter store poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect();
    for (name, dims) in &expected {
        match tensors.get(name) {
            Some(t) if t.dims() == dims.as_slice() => {}
            Some(t) => bail!("{method} tensor `{name}` has shape {:?}, expected {dims:?}", t.dims()),
            None => bail!("model file has no `{name}` tensor"),
        }
    }
    if let Some(extra) = tensors.keys().find(|k| !expected.contains_key(*k)) {
        bail!("model file has an unexpected tensor `{extra}`");
    }
    varmap_from(tensors, device)
}

/// Removes tensor `name` from a model file's tensors, checking its shape, as f32 on `device`.
pub fn take_tensor(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    dims: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let tensor = tensors.remove(name).ok_or_else(|| anyhow::anyhow!("model file has no `{name}` tensor"))?;
    if tensor.dims() != dims {
        bail!("`{name}` has shape {:?}, expected {dims:?}", tensor.dims());
    }
    Ok(tensor.to_device(device)?.to_dtype(DType::F32)?)
}

/// Visits `count` training items in a fresh seeded order every epoch, `per_step` at a time.
pub struct ShuffledBatches {
    order: Vec<usize>,
    per_step: usize,
    rng: crate::rng::SplitMix64,
}

impl ShuffledBatches {
    pub fn new(count: usize, per_step: usize, seed: u64) -> Self {
        Self { order: (0..count).collect(), per_step: per_step.max(1), rng: crate::rng::SplitMix64::new(seed) }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.order.len().div_ceil(self.per_step)
    }

    /// For schedules with their own number of steps per epoch: step `step` of epoch `epoch` takes the next
    /// batch, going through the items in a fresh order each time they have all been seen.
    pub fn cycling(&mut self, epoch: usize, steps_per_epoch: usize, step: usize) -> &[usize] {
        let step = (epoch * steps_per_epoch + step) % self.steps_per_epoch();
        self.batch(step)
    }

    /// The items of `step` in the current epoch; step 0 draws a new order.
    pub fn batch(&mut self, step: usize) -> &[usize] {
        if step == 0 {
            for i in (1..self.order.len()).rev() {
                self.order.swap(i, self.rng.below(i + 1));
            }
        }
        let start = (step * self.per_step).min(self.order.len());
        &self.order[start..(start + self.per_step).min(self.order.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model file written before `adam_beta1` existed trained with AdamW's default 0.9 and must read as such.
    #[test]
    fn a_schedule_without_adam_beta1_reads_as_the_old_default() {
        let old: Schedule = serde_json::from_value(serde_json::json!({
            "epochs": 3, "learning_rate": 1e-3, "weight_decay": 1e-5, "time_budget_seconds": 0.0, "seed": 0
        }))
        .unwrap();
        assert_eq!(old.adam_beta1, 0.9);
        assert_eq!(old.plan(1).adam_beta1, 0.9);
        assert_eq!(old.final_learning_rate_share, 1.0, "files saved before the decay trained at a constant rate");
        assert!((0..3).all(|step| old.plan(1).learning_rate_at(step) == 1e-3));
    }

    /// `train` applies the schedule's rate at every step: on a loss whose gradient is the same at every step,
    /// AdamW moves a variable by about the rate each step, so the distance travelled is the sum of the rates —
    /// half as far with a decay to 0 as at a constant rate.
    #[test]
    fn training_follows_the_decayed_rate() {
        let travelled = |share: f64| {
            let varmap = VarMap::new();
            let x = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)
                .get_with_hints(1, "x", candle_nn::Init::Const(0.0))
                .unwrap();
            let schedule = Schedule { final_learning_rate_share: share, weight_decay: 0.0, ..Schedule::new(4, 0.01) };
            let plan = schedule.plan(5);
            train(&varmap, &plan, &crate::progress::NoProgress, |_, _| Ok(x.sum_all()?)).unwrap();
            let expected: f64 = (0..20).map(|step| plan.learning_rate_at(step)).sum();
            (-x.to_vec1::<f32>().unwrap()[0] as f64, expected)
        };
        let (constant, constant_expected) = travelled(1.0);
        let (decayed, decayed_expected) = travelled(0.0);
        assert!((constant - constant_expected).abs() < 1e-3 * constant_expected, "{constant} vs {constant_expected}");
        assert!((decayed - decayed_expected).abs() < 1e-3 * decayed_expected, "{decayed} vs {decayed_expected}");
        assert!(decayed < 0.6 * constant, "the decay must slow the steps: {decayed} vs {constant}");
    }

    #[test]
    fn the_cosine_decay_runs_from_the_rate_to_its_share() {
        let plan = Schedule { final_learning_rate_share: 0.1, ..Schedule::new(4, 1.0) }.plan(5);
        let rates: Vec<f64> = (0..20).map(|step| plan.learning_rate_at(step)).collect();
        assert_eq!(rates[0], 1.0);
        assert!((rates[19] - 0.1).abs() < 1e-12, "{}", rates[19]);
        assert!((rates[19 / 2] + rates[19 - 19 / 2] - 1.1).abs() < 0.02, "symmetric about the middle");
        assert!(rates.windows(2).all(|pair| pair[1] < pair[0]), "falls at every step: {rates:?}");
        assert_eq!(plan.learning_rate_at(100), rates[19], "past the end it stays at the floor");
    }

    #[test]
    fn the_seed_fixes_every_randomly_drawn_weight_and_keeps_constants() {
        let build = |seed: u64| {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            candle_nn::linear(200, 50, vb.pp("layer")).unwrap();
            vb.get_with_hints(4, "gamma", candle_nn::Init::Const(0.0)).unwrap();
            seed_initial_weights(&varmap, seed).unwrap();
            let values = |name: &str| {
                let data = varmap.data().lock().unwrap();
                data[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            (values("layer.weight"), values("layer.bias"), values("gamma"))
        };
        let (weight, bias, gamma) = build(7);
        assert_eq!(build(7), (weight.clone(), bias.clone(), gamma.clone()), "same seed, same weights");
        assert_ne!(build(8).0, weight, "another seed, other weights");
        assert_eq!(gamma, vec![0.0; 4], "a constant initialiser is kept");
        // Kaiming: standard deviation √(2/200) = 0.1; biases within ±1/√200.
        let std = (weight.iter().map(|w| w * w).sum::<f32>() / weight.len() as f32).sqrt();
        assert!((std - 0.1).abs() < 0.005, "{std}");
        assert!(bias.iter().all(|b| b.abs() <= 1.0 / 200f32.sqrt()));
    }

    /// Candle's Metal backend has no F64: a device tensor converted to F64 fails there (training once did, on its
    /// loss). Values that need f64 are read back as F32 and widened on the CPU. This guards every engine file
    /// outside its tests, since no Metal machine runs the suite.
    #[test]
    fn no_device_tensor_becomes_f64() {
        fn visit(dir: &std::path::Path, offenders: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, offenders);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                    for (number, line) in code.lines().enumerate() {
                        if line.contains("DType::F64") && !line.trim_start().starts_with("//") {
                            offenders.push(format!("{}:{}: {}", path.display(), number + 1, line.trim()));
                        }
                    }
                }
            }
        }
        let mut offenders = Vec::new();
        visit(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut offenders);
        assert!(offenders.is_empty(), "F64 on a device:\n{}", offenders.join("\n"));
    }
}
