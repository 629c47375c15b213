//! Values a method derives once from each training image and reads back every epoch (a frozen teacher's maps,
//! pooled inputs), held in a [`RecordStore`]: up to [`PER_IMAGE_VALUES_IN_MEMORY`] in memory, the rest in a
//! temporary file, so that a fit's memory does not grow with the folder.

use crate::dataset::record_store::{RecordStore, PER_IMAGE_VALUES_IN_MEMORY};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// One tensor of equal shape per training image, by position.
pub struct PerImageTensors {
    what: &'static str,
    /// The shape of one image's tensor; set by the first batch.
    shape: Vec<usize>,
    store: Option<RecordStore<f32>>,
}

impl PerImageTensors {
    pub fn new(what: &'static str) -> Self {
        Self { what, shape: Vec::new(), store: None }
    }

    /// Appends a batch `(B, …)`: one tensor per image.
    pub fn push(&mut self, batch: &Tensor) -> Result<()> {
        let (_, shape) = batch.dims().split_first().ok_or_else(|| anyhow::anyhow!("{}: a scalar batch", self.what))?;
        let store = match &mut self.store {
            Some(store) if shape == self.shape.as_slice() => store,
            Some(_) => bail!("{}: a batch of {:?} among images of {:?}", self.what, shape, self.shape),
            None => {
                self.shape = shape.to_vec();
                let record_len = shape.iter().product();
                self.store.insert(RecordStore::new(self.what, record_len, PER_IMAGE_VALUES_IN_MEMORY))
            }
        };
        store.extend(&batch.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn len(&self) -> usize {
        self.store.as_ref().map_or(0, RecordStore::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensors of `positions`, stacked `(positions.len(), …)` on `device`.
    pub fn gather(&self, positions: &[usize], device: &Device) -> Result<Tensor> {
        let Some(store) = &self.store else { bail!("{}: nothing stored", self.what) };
        let shape: Vec<usize> = std::iter::once(positions.len()).chain(self.shape.iter().copied()).collect();
        Ok(Tensor::from_vec(store.gather(positions)?, shape, device)?)
    }
}
