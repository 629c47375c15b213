//! Equal-sized records (decoded training images, a frozen network's features of each image) that a fit reads
//! many times: the first ones in memory up to a byte budget, the rest in an unnamed temporary file that the
//! system deletes when the store is dropped. A fit on 20,000 images then holds the budget, not the folder, and
//! reads back exactly the values it stored, so results do not depend on where a record lives.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

/// Bytes of values a method derives once per training image and reads every epoch (a frozen network's
/// features, pooled inputs) that one store keeps in memory; beyond it, records are read back from the file.
pub const PER_IMAGE_VALUES_IN_MEMORY: usize = 512 << 20;

/// A plain value a [`RecordStore`] writes to its file in native byte order.
pub trait Plain: Copy + Default + Send + Sync + 'static {
    const BYTES: usize;
    fn write_to(values: &[Self], bytes: &mut Vec<u8>);
    fn read_from(bytes: &[u8], values: &mut [Self]);
}

impl Plain for u8 {
    const BYTES: usize = 1;
    fn write_to(values: &[Self], bytes: &mut Vec<u8>) {
        bytes.extend_from_slice(values);
    }
    fn read_from(bytes: &[u8], values: &mut [Self]) {
        values.copy_from_slice(bytes);
    }
}

impl Plain for f32 {
    const BYTES: usize = 4;
    fn write_to(values: &[Self], bytes: &mut Vec<u8>) {
        bytes.extend(values.iter().flat_map(|v| v.to_ne_bytes()));
    }
    fn read_from(bytes: &[u8], values: &mut [Self]) {
        for (value, chunk) in values.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
        }
    }
}

/// Records of `record_len` values each, appended in order and read by index.
pub struct RecordStore<T: Plain> {
    /// What the records are, for error messages ("training images").
    what: &'static str,
    record_len: usize,
    /// How many records stay in memory.
    memory_records: usize,
    in_memory: Vec<T>,
    /// Created at the first record that does not fit in memory.
    spill: Option<Mutex<File>>,
    len: usize,
}

impl<T: Plain> RecordStore<T> {
    /// A store of records of `record_len` values that keeps up to `memory_budget` bytes of them in memory.
    pub fn new(what: &'static str, record_len: usize, memory_budget: usize) -> Self {
        let record_bytes = (record_len * T::BYTES).max(1);
        Self {
            what,
            record_len,
            memory_records: memory_budget / record_bytes,
            in_memory: Vec::new(),
            spill: None,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn record_len(&self) -> usize {
        self.record_len
    }

    /// Records that live in the temporary file.
    pub fn spilled(&self) -> usize {
        self.len.saturating_sub(self.memory_records)
    }

    /// Appends whole records (`values.len()` a multiple of the record length).
    pub fn extend(&mut self, values: &[T]) -> Result<()> {
        if self.record_len == 0 || !values.len().is_multiple_of(self.record_len) {
            bail!("{}: {} values are not whole records of {}", self.what, values.len(), self.record_len);
        }
        let records = values.len() / self.record_len;
        let into_memory = records.min(self.memory_records.saturating_sub(self.len));
        let (memory, file) = values.split_at(into_memory * self.record_len);
        self.in_memory.extend_from_slice(memory);
        if !file.is_empty() {
            let spill = match &mut self.spill {
                Some(spill) => spill,
                None => self.spill.insert(Mutex::new(tempfile().with_context(|| self.spill_failure())?)),
            };
            let mut bytes = Vec::with_capacity(file.len() * T::BYTES);
            T::write_to(file, &mut bytes);
            let file = spill.get_mut().unwrap_or_else(|p| p.into_inner());
            file.seek(SeekFrom::End(0)).and_then(|_| file.write_all(&bytes)).with_context(|| self.spill_failure())?;
        }
        self.len += records;
        Ok(())
    }

    /// Values `start..start + out.len()` of record `index` into `out`.
    pub fn read_part(&self, index: usize, start: usize, out: &mut [T]) -> Result<()> {
        if index >= self.len || start + out.len() > self.record_len {
            bail!("{}: record {index} values {start}+{} is outside the store", self.what, out.len());
        }
        if index < self.memory_records {
            let offset = index * self.record_len + start;
            out.copy_from_slice(&self.in_memory[offset..offset + out.len()]);
            return Ok(());
        }
        let spill = self.spill.as_ref().expect("records beyond memory are in the file");
        let offset = ((index - self.memory_records) * self.record_len + start) * T::BYTES;
        let mut bytes = vec![0u8; out.len() * T::BYTES];
        let mut file = spill.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start(offset as u64))
            .and_then(|_| file.read_exact(&mut bytes))
            .with_context(|| format!("{}: reading record {index} back from the temporary file", self.what))?;
        T::read_from(&bytes, out);
        Ok(())
    }

    /// Record `index`.
    pub fn record(&self, index: usize) -> Result<Vec<T>> {
        let mut out = vec![T::default(); self.record_len];
        self.read_part(index, 0, &mut out)?;
        Ok(out)
    }

    /// Records `indices`, one after another.
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); indices.len() * self.record_len];
        for (&index, slot) in indices.iter().zip(out.chunks_exact_mut(self.record_len.max(1))) {
            self.read_part(index, 0, slot)?;
        }
        Ok(out)
    }

    /// Records `range`, one after another.
    pub fn range(&self, range: std::ops::Range<usize>) -> Result<Vec<T>> {
        self.gather(&range.collect::<Vec<_>>())
    }

    fn spill_failure(&self) -> String {
        format!(
            "{}: cannot write the temporary file that holds what does not fit in memory (is the temporary \
             folder {} full?)",
            self.what,
            std::env::temp_dir().display()
        )
    }
}

/// An unnamed file in the temporary folder, deleted by the system when closed.
fn tempfile() -> std::io::Result<File> {
    tempfile::tempfile()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_the_same_from_memory_and_from_the_file() {
        // Two records of 3 floats fit in 24 bytes; the other three go to the file.
        let mut store = RecordStore::<f32>::new("test records", 3, 24);
        let values: Vec<f32> = (0..15).map(|v| v as f32 * 0.5 - 1.0).collect();
        store.extend(&values[..6]).unwrap();
        store.extend(&values[6..]).unwrap();
        assert_eq!((store.len(), store.spilled()), (5, 3));
        for index in 0..5 {
            assert_eq!(store.record(index).unwrap(), values[index * 3..][..3], "record {index}");
        }
        assert_eq!(store.gather(&[4, 0]).unwrap(), [&values[12..15], &values[0..3]].concat());
        assert_eq!(store.range(1..3).unwrap(), values[3..9]);
        let mut part = [0f32; 2];
        store.read_part(3, 1, &mut part).unwrap();
        assert_eq!(part, values[10..12]);
        assert!(store.record(5).is_err(), "past the end");
        assert!(store.read_part(0, 2, &mut part).is_err(), "past the record's end");
        assert!(store.extend(&values[..2]).is_err(), "not a whole record");
    }

    #[test]
    fn a_store_within_its_budget_makes_no_file() {
        let mut store = RecordStore::<u8>::new("test bytes", 4, 1 << 20);
        store.extend(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert!(store.spill.is_none());
        assert_eq!(store.record(1).unwrap(), [5, 6, 7, 8]);
    }
}
