//! Reader for PyTorch checkpoints (`.pth`), both the legacy (pre-1.6) stream format and the zip format.
//!
//! The pickles are interpreted by candle's pickle `Stack`, a plain interpreter that builds a tree of objects and
//! never calls anything. On top of that we refuse every global that is not a tensor-rebuild helper or a storage
//! type, so a checkpoint that would run code under Python is reported, not half-read. Tensors are rebuilt by
//! honouring their strides: this checkpoint stores its conv weights in TensorFlow's HWIO order behind permuted
//! strides, so reading the storage as if contiguous silently scrambles them.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

/// A tensor read from a checkpoint: contiguous `f32` data in row-major order of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Largest pickle we parse; real state dicts are tens of kilobytes.
const MAX_PICKLE_BYTES: usize = 64 << 20;
/// Largest checkpoint file, and most tensor data (bytes, all storages of a zip together) we read from one.
/// EfficientNet-Lite0's checkpoint is 19 MB.
const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;
/// Most values the rebuilt tensors may hold together (1 GiB of f32): a view may not hold more values than its
/// storage, but several views may share one storage.
const MAX_TENSOR_VALUES: usize = 1 << 28;

const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "float32"),
    ("torch", "float16"),
];

/// Reads every floating-point tensor of a `.pth` file. Integer tensors (batch counters) are skipped.
pub fn read_pth(path: &Path) -> Result<Vec<(String, PthTensor)>> {
    let size = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    if size > MAX_CHECKPOINT_BYTES {
        bail!("{}: {size} bytes is too large for a backbone checkpoint", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let parsed = std::panic::catch_unwind(|| read_pth_bytes(&bytes));
    match parsed {
        Ok(result) => result.with_context(|| format!("{}: not a readable PyTorch checkpoint", path.display())),
        Err(_) => bail!("{}: malformed PyTorch checkpoint (the parser gave up)", path.display()),
    }
}

pub fn read_pth_bytes(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes, MAX_CHECKPOINT_BYTES as usize)
    } else {
        read_legacy(bytes)
    }
}

/// Most bytes the objects of one pickle may occupy once built: stack and memo together, each object counted at
/// [`OBJECT_BYTES`] plus its text. A real state dict builds a few hundred kilobytes; a pickle that copies
/// memoised objects into themselves ("billion laughs") or memoises one large string many times would otherwise
/// exhaust memory in candle's interpreter, which deep-copies memo entries on every get and put.
const MAX_PICKLE_BUILD_BYTES: u64 = 256 << 20;
/// What one object costs in the interpreter besides its text (an `Object` and its box or vector slot, rounded up).
const OBJECT_BYTES: u64 = 64;

/// The interpreter's stack and memo as sizes only: what [`check_pickle_expansion`] tracks instead of objects.
#[derive(Default)]
struct BuildSizes {
    /// Per stack entry its size, `None` for a mark.
    stack: Vec<Option<u64>>,
    memo: HashMap<u32, u64>,
    /// Sum of the stack's sizes and the memo's.
    live: u64,
}

impl BuildSizes {
    fn push(&mut self, size: u64) {
        self.live = self.live.saturating_add(size);
        self.stack.push(Some(size));
    }

    fn pop(&mut self) -> Result<u64> {
        let size = self.stack.pop().flatten().ok_or_else(|| anyhow!("pickle: malformed"))?;
        self.live -= size;
        Ok(size)
    }

    /// Pops the entries above the last mark and the mark; their total size.
    fn pop_to_mark(&mut self) -> Result<u64> {
        let mut total = 0u64;
        loop {
            match self.stack.pop() {
                Some(None) => return Ok(total),
                Some(Some(size)) => {
                    self.live -= size;
                    total = total.saturating_add(size);
                }
                None => bail!("pickle: missing mark"),
            }
        }
    }

    /// Replaces the popped `parts` by one new object holding them.
    fn combine(&mut self, parts: u64) {
        self.push(parts.saturating_add(OBJECT_BYTES));
    }

    /// Moves `added` bytes (already popped) into the container on top of the stack.
    fn grow_top(&mut self, added: u64) -> Result<()> {
        let top = self.stack.last_mut().and_then(|s| s.as_mut()).ok_or_else(|| anyhow!("pickle: malformed"))?;
        *top = top.saturating_add(added);
        self.live = self.live.saturating_add(added);
        Ok(())
    }

    /// PUT: the memo gets a deep copy of the top object.
    fn memo_put(&mut self, id: u32) {
        let size = self.stack.last().copied().flatten().unwrap_or(OBJECT_BYTES);
        if let Some(old) = self.memo.insert(id, size) {
            self.live -= old;
        }
        self.live = self.live.saturating_add(size);
    }

    /// GET: the stack gets a deep copy of the memo entry.
    fn memo_get(&mut self, id: u32) {
        let size = self.memo.get(&id).copied().unwrap_or(OBJECT_BYTES);
        self.push(size);
    }
}

/// Computes (with saturation) how many bytes the objects of the pickle starting at `bytes` would occupy, without
/// building them, and refuses it past [`MAX_PICKLE_BUILD_BYTES`]. Mirrors the opcodes candle's interpreter
/// accepts; anything else is left for the interpreter to reject.
fn check_pickle_expansion(bytes: &[u8]) -> Result<()> {
    let mut sizes = BuildSizes::default();
    let mut position = 0usize;
    let take = |position: &mut usize, n: usize| -> Result<&[u8]> {
        let end = position.checked_add(n).ok_or_else(|| anyhow!("pickle: truncated"))?;
        let slice = bytes.get(*position..end).ok_or_else(|| anyhow!("pickle: truncated"))?;
        *position = end;
        Ok(slice)
    };
    let u32_at = |slice: &[u8]| u32::from_le_bytes(slice.try_into().expect("4 bytes"));
    loop {
        let opcode = take(&mut position, 1)?[0];
        match opcode {
            0x80 => drop(take(&mut position, 1)?),
            b'c' => {
                let mut text = 0u64;
                for _ in 0..2 {
                    let line_end = bytes[position..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| anyhow!("pickle: truncated"))?;
                    position += line_end + 1;
                    text += line_end as u64;
                }
                sizes.push(OBJECT_BYTES + text);
            }
            b'q' => sizes.memo_put(take(&mut position, 1)?[0] as u32),
            b'r' => sizes.memo_put(u32_at(take(&mut position, 4)?)),
            b'h' => sizes.memo_get(take(&mut position, 1)?[0] as u32),
            b'j' => sizes.memo_get(u32_at(take(&mut position, 4)?)),
            b')' | b']' | b'}' | 0x88 | 0x89 | b'N' => sizes.push(OBJECT_BYTES),
            b'(' => sizes.stack.push(None),
            b'X' => {
                let length = u32_at(take(&mut position, 4)?) as usize;
                take(&mut position, length)?;
                sizes.push(OBJECT_BYTES + length as u64);
            }
            b'J' => drop(take(&mut position, 4).map(|_| sizes.push(OBJECT_BYTES))?),
            b'K' => drop(take(&mut position, 1).map(|_| sizes.push(OBJECT_BYTES))?),
            b'M' => drop(take(&mut position, 2).map(|_| sizes.push(OBJECT_BYTES))?),
            b'G' => drop(take(&mut position, 8).map(|_| sizes.push(OBJECT_BYTES))?),
            0x8a => {
                // candle decodes LONG1 into an i64 by shifting each byte into place: more than 8 bytes overflows.
                let length = take(&mut position, 1)?[0] as usize;
                if length > 8 {
                    bail!("pickle: a {length}-byte integer is too large");
                }
                take(&mut position, length)?;
                sizes.push(OBJECT_BYTES);
            }
            b't' | b'd' => {
                let parts = sizes.pop_to_mark()?;
                sizes.combine(parts);
            }
            0x85..=0x87 => {
                let mut parts = 0u64;
                for _ in 0..(opcode - 0x84) {
                    parts = parts.saturating_add(sizes.pop()?);
                }
                sizes.combine(parts);
            }
            b'R' | b'b' | 0x81 => {
                let parts = sizes.pop()?.saturating_add(sizes.pop()?);
                sizes.combine(parts);
            }
            b'Q' => {
                let inner = sizes.pop()?;
                sizes.combine(inner);
            }
            b'a' => {
                let added = sizes.pop()?;
                sizes.grow_top(added)?;
            }
            b's' => {
                let added = sizes.pop()?.saturating_add(sizes.pop()?);
                sizes.grow_top(added)?;
            }
            b'e' | b'u' => {
                let added = sizes.pop_to_mark()?;
                sizes.grow_top(added)?;
            }
            _ => return Ok(()),
        }
        if sizes.live > MAX_PICKLE_BUILD_BYTES {
            bail!(
                "refused: the pickle would build more than {MAX_PICKLE_BUILD_BYTES} bytes of objects (a memory bomb?)"
            );
        }
    }
}

// A `Cursor` over a slice is its own `BufRead`: no read-ahead, so its position is exactly where a pickle ended.
fn parse_one_pickle(reader: &mut Cursor<&[u8]>) -> Result<Object> {
    let start = reader.position() as usize;
    check_pickle_expansion(&reader.get_ref()[start..])?;
    let mut stack = Stack::empty();
    stack.read_loop(reader).map_err(|e| anyhow!("pickle: {e}"))?;
    let object = stack.finalize().map_err(|e| anyhow!("pickle: {e}"))?;
    refuse_foreign_globals(&object)?;
    Ok(object)
}

fn refuse_foreign_globals(object: &Object) -> Result<()> {
    match object {
        Object::Class { module_name, class_name } => {
            if !ALLOWED_GLOBALS.iter().any(|(m, c)| m == module_name && c == class_name) {
                bail!("refused: the checkpoint references `{module_name}.{class_name}`, which is not tensor data");
            }
            Ok(())
        }
        Object::Tuple(items) | Object::List(items) => items.iter().try_for_each(refuse_foreign_globals),
        Object::Dict(pairs) => pairs.iter().try_for_each(|(k, v)| {
            refuse_foreign_globals(k)?;
            refuse_foreign_globals(v)
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            refuse_foreign_globals(callable)?;
            refuse_foreign_globals(args)
        }
        Object::PersistentLoad(inner) => refuse_foreign_globals(inner),
        _ => Ok(()),
    }
}

/// What `_rebuild_tensor_v2(storage, offset, size, stride, ...)` describes.
struct TensorRef {
    name: String,
    storage_key: String,
    storage_type: String,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

fn to_usize(object: Object) -> Result<usize> {
    match object {
        Object::Int(v) if v >= 0 => Ok(v as usize),
        Object::Long(v) if v >= 0 => Ok(v as usize),
        other => bail!("expected a non-negative integer, found {other:?}"),
    }
}

fn to_usizes(object: Object) -> Result<Vec<usize>> {
    match object {
        Object::Tuple(items) | Object::List(items) => items.into_iter().map(to_usize).collect(),
        other => bail!("expected a tuple of integers, found {other:?}"),
    }
}

fn tensor_refs(state_dict: Object) -> Result<Vec<TensorRef>> {
    let pairs = match state_dict {
        Object::Dict(pairs) => pairs,
        // `{"state_dict": {...}}` wrappers are common.
        Object::Reduce { args, .. } => return tensor_refs(*args),
        other => bail!("the checkpoint holds no state dict (found {})", short_debug(&other)),
    };
    let mut refs = Vec::new();
    for (key, value) in pairs {
        let Object::Unicode(name) = key else { continue };
        if let Object::Dict(_) = value {
            if name == "state_dict" || name == "model" {
                return tensor_refs(value);
            }
        }
        if let Some(tensor) = tensor_ref(name, value)? {
            refs.push(tensor);
        }
    }
    if refs.is_empty() {
        bail!("the checkpoint holds no tensors");
    }
    Ok(refs)
}

fn tensor_ref(name: String, value: Object) -> Result<Option<TensorRef>> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let (callable, args) = match (*callable, *args) {
        (Object::Class { class_name, .. }, Object::Tuple(mut inner)) if class_name == "_rebuild_parameter" => {
            if inner.is_empty() {
                return Ok(None);
            }
            match inner.remove(0) {
                Object::Reduce { callable, args } => (*callable, *args),
                _ => return Ok(None),
            }
        }
        (callable, args) => (callable, args),
    };
    match &callable {
        Object::Class { class_name, .. } if class_name.starts_with("_rebuild_tensor") => {}
        _ => return Ok(None),
    }
    let Object::Tuple(args) = args else { bail!("{name}: malformed tensor record") };
    let mut args = args.into_iter();
    let (Some(storage), Some(offset), Some(shape), Some(strides)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        bail!("{name}: tensor record has too few fields")
    };
    let Object::PersistentLoad(storage) = storage else { bail!("{name}: tensor without storage") };
    let Object::Tuple(storage) = *storage else { bail!("{name}: malformed storage record") };
    let mut storage = storage.into_iter();
    let (_tag, storage_type, key) = (storage.next(), storage.next(), storage.next());
    let storage_type = match storage_type {
        Some(Object::Class { class_name, .. }) => class_name,
        _ => bail!("{name}: storage without a type"),
    };
    let storage_key = match key {
        Some(Object::Unicode(key)) => key,
        _ => bail!("{name}: storage without a key"),
    };
    Ok(Some(TensorRef {
        name,
        storage_key,
        storage_type,
        offset: to_usize(offset)?,
        shape: to_usizes(shape)?,
        strides: to_usizes(strides)?,
    }))
}

fn short_debug(object: &Object) -> String {
    let text = format!("{object:?}");
    text.chars().take(80).collect()
}

fn element_size(storage_type: &str) -> Option<usize> {
    match storage_type {
        "FloatStorage" | "IntStorage" | "float32" => Some(4),
        "HalfStorage" | "BFloat16Storage" | "float16" => Some(2),
        "DoubleStorage" | "LongStorage" => Some(8),
        _ => None,
    }
}

fn decode_floats(storage_type: &str, bytes: &[u8]) -> Option<Vec<f32>> {
    let values = match storage_type {
        "FloatStorage" | "float32" => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        "HalfStorage" | "float16" => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        "BFloat16Storage" => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        "DoubleStorage" => {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("chunk of 8")) as f32).collect()
        }
        _ => return None,
    };
    Some(values)
}

/// Gathers a strided view of `storage` into a contiguous row-major buffer.
fn gather_strided(name: &str, storage: &[f32], offset: usize, shape: &[usize], strides: &[usize]) -> Result<Vec<f32>> {
    if shape.len() != strides.len() {
        bail!("{name}: {} dimensions but {} strides", shape.len(), strides.len());
    }
    let count = shape.iter().try_fold(1usize, |total, &n| total.checked_mul(n));
    let count = count.ok_or_else(|| anyhow!("{name}: its shape {shape:?} overflows"))?;
    if count == 0 {
        return Ok(Vec::new());
    }
    // A saved tensor holds at most as many values as its storage; zero or overlapping strides could otherwise
    // let a one-value storage declare any size.
    if count > storage.len() {
        bail!("{name}: its shape {shape:?} has more values ({count}) than its storage ({})", storage.len());
    }
    let reach =
        shape.iter().zip(strides).try_fold(offset, |total, (&n, &s)| total.checked_add((n - 1).checked_mul(s)?));
    match reach {
        Some(last_index) if last_index < storage.len() => {}
        _ => {
            bail!("{name}: its view (offset {offset}, strides {strides:?}) reaches past a storage of {}", storage.len())
        }
    }
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        let position = offset + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(storage[position]);
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            if index[dim] < shape[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    Ok(out)
}

fn build_tensors(refs: Vec<TensorRef>, storages: &HashMap<String, Vec<f32>>) -> Result<Vec<(String, PthTensor)>> {
    let mut tensors = Vec::new();
    let mut total_values = 0usize;
    for tensor in refs {
        if element_size(&tensor.storage_type).is_none() {
            bail!("{}: unsupported storage type {}", tensor.name, tensor.storage_type);
        }
        let Some(storage) = storages.get(&tensor.storage_key) else {
            // Integer storages (num_batches_tracked) are not decoded as floats.
            continue;
        };
        let data = gather_strided(&tensor.name, storage, tensor.offset, &tensor.shape, &tensor.strides)?;
        total_values += data.len();
        if total_values > MAX_TENSOR_VALUES {
            bail!("the checkpoint's tensors hold more than {MAX_TENSOR_VALUES} values together");
        }
        tensors.push((tensor.name, PthTensor { shape: tensor.shape, data }));
    }
    Ok(tensors)
}

fn read_legacy(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    // The first pickle is a 10-byte LONG1 magic number; it is checked by its bytes because it overflows the
    // interpreter's i64.
    const MAGIC_PICKLE: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19\x2e";
    if !bytes.starts_with(MAGIC_PICKLE) {
        bail!("not a PyTorch checkpoint (no magic number)");
    }
    let mut reader = Cursor::new(&bytes[MAGIC_PICKLE.len()..]);
    let _protocol = parse_one_pickle(&mut reader)?;
    let _sys_info = parse_one_pickle(&mut reader)?;
    let state_dict = parse_one_pickle(&mut reader)?;
    let refs = tensor_refs(state_dict)?;
    let keys = match parse_one_pickle(&mut reader)? {
        Object::List(keys) | Object::Tuple(keys) => keys,
        _ => bail!("storage key list missing"),
    };
    let storage_types: HashMap<&str, &str> =
        refs.iter().map(|r| (r.storage_key.as_str(), r.storage_type.as_str())).collect();
    let mut position = MAGIC_PICKLE.len() + reader.position() as usize;
    let mut storages = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else { bail!("malformed storage key") };
        let Some(&storage_type) = storage_types.get(key.as_str()) else {
            bail!("storage {key} is not used by any tensor")
        };
        let element = element_size(storage_type).ok_or_else(|| anyhow!("unsupported storage type {storage_type}"))?;
        let header = bytes.get(position..position + 8).ok_or_else(|| anyhow!("truncated at storage {key}"))?;
        let count = u64::from_le_bytes(header.try_into().expect("8 bytes")) as usize;
        position += 8;
        let length = count.checked_mul(element).ok_or_else(|| anyhow!("storage {key} too large"))?;
        let data = bytes
            .get(position..position.saturating_add(length))
            .ok_or_else(|| anyhow!("truncated inside storage {key}"))?;
        position += length;
        if let Some(values) = decode_floats(storage_type, data) {
            storages.insert(key, values);
        }
    }
    build_tensors(refs, &storages)
}

/// Reads a zip checkpoint whose storages hold at most `data_budget` bytes together.
fn read_zip(bytes: &[u8], data_budget: usize) -> Result<Vec<(String, PthTensor)>> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).context("broken zip container")?;
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let pickle_name = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("zip checkpoint without data.pkl"))?
        .clone();
    let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
    let pickle = read_zip_entry(&mut archive, &pickle_name, MAX_PICKLE_BYTES)?;
    let mut reader = Cursor::new(pickle.as_slice());
    let refs = tensor_refs(parse_one_pickle(&mut reader)?)?;
    let mut storages = HashMap::new();
    let mut budget = data_budget;
    for tensor in &refs {
        if storages.contains_key(&tensor.storage_key) {
            continue;
        }
        let entry = format!("{prefix}data/{}", tensor.storage_key);
        let data = read_zip_entry(&mut archive, &entry, budget)?;
        budget -= data.len();
        if let Some(values) = decode_floats(&tensor.storage_type, &data) {
            storages.insert(tensor.storage_key.clone(), values);
        }
    }
    build_tensors(refs, &storages)
}

/// Reads a zip entry of at most `limit` bytes. Neither the declared size (it sizes nothing before the data is
/// there) nor the compression ratio is trusted: reading stops one byte past the limit.
fn read_zip_entry(archive: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str, limit: usize) -> Result<Vec<u8>> {
    let file = archive.by_name(name).with_context(|| format!("missing entry {name}"))?;
    let too_large = || anyhow!("entry {name} is implausibly large (over {limit} bytes)");
    if file.size() > limit as u64 {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity((file.size() as usize).min(1 << 20));
    file.take(limit as u64 + 1).read_to_end(&mut data).with_context(|| format!("entry {name} is damaged"))?;
    if data.len() > limit {
        return Err(too_large());
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gather_transposes() {
        // A 2x3 matrix stored column-major: strides (1, 2).
        let storage = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let out = gather_strided("t", &storage, 0, &[2, 3], &[1, 2]).unwrap();
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn out_of_range_view_is_an_error() {
        let storage = [1.0, 2.0];
        assert!(gather_strided("t", &storage, 1, &[2], &[1]).is_err());
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        assert!(read_pth_bytes(b"definitely not a pickle").is_err());
        assert!(read_pth_bytes(&[]).is_err());
        assert!(read_pth_bytes(b"PK\x03\x04junk").is_err());
    }

    #[test]
    fn zip_checkpoint_with_strides_and_offsets() {
        // Written by Python's pickle with torch's record shapes (tests/data/README.md): `layer.weight` is 2×3
        // stored column-major, `layer.bias` starts at element 1 of its storage.
        let bytes = include_bytes!("../../../tests/data/tiny_zip_checkpoint.pth");
        let tensors: std::collections::BTreeMap<String, PthTensor> =
            read_pth_bytes(bytes).unwrap().into_iter().collect();
        assert_eq!(tensors["layer.weight"], PthTensor { shape: vec![2, 3], data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] });
        assert_eq!(tensors["layer.bias"], PthTensor { shape: vec![3], data: vec![7.0, 8.0, 9.0] });
    }

    #[test]
    fn self_referencing_pickle_bomb_is_refused() {
        // 1, then 60 times: t = (t, t) — 2^60 objects if built.
        let mut pickle = b"\x80\x02K\x01q\x00".to_vec();
        for level in 0..60u8 {
            pickle.extend_from_slice(&[b'h', level, b'h', level, 0x86, b'q', level + 1]);
        }
        pickle.push(b'.');
        let mut reader = Cursor::new(&pickle[..]);
        let error = parse_one_pickle(&mut reader).unwrap_err().to_string();
        assert!(error.contains("memory bomb"), "{error}");
    }

    #[test]
    fn dict_bomb_is_refused() {
        // DICT pops to its mark: `( hN hN hN hN d qN+1` holds 4 copies of level N — 4^40 objects if built. The
        // size pre-pass once counted DICT as one object and let this through to the interpreter.
        let mut pickle = b"\x80\x02K\x01q\x00".to_vec();
        for level in 0..40u8 {
            pickle.extend_from_slice(&[
                b'(',
                b'h',
                level,
                b'h',
                level,
                b'h',
                level,
                b'h',
                level,
                b'd',
                b'q',
                level + 1,
            ]);
        }
        pickle.push(b'.');
        let error = parse_one_pickle(&mut Cursor::new(&pickle[..])).unwrap_err().to_string();
        assert!(error.contains("memory bomb"), "{error}");
    }

    #[test]
    fn memoised_string_copied_many_times_is_refused() {
        // One 1 MiB string, memoised, then got 300 times: 300 MiB of copies from a 1 MiB file.
        let mut pickle = b"\x80\x02(X".to_vec();
        pickle.extend_from_slice(&(1u32 << 20).to_le_bytes());
        pickle.extend(std::iter::repeat_n(b'a', 1 << 20));
        pickle.extend_from_slice(b"q\x00");
        for _ in 0..300 {
            pickle.extend_from_slice(b"h\x00");
        }
        pickle.extend_from_slice(b"l.");
        let error = parse_one_pickle(&mut Cursor::new(&pickle[..])).unwrap_err().to_string();
        assert!(error.contains("memory bomb"), "{error}");
    }

    #[test]
    fn oversized_long_is_an_error_not_a_panic() {
        let mut pickle = b"\x80\x02\x8a\x40".to_vec();
        pickle.extend([0xff; 64]);
        pickle.push(b'.');
        let error = parse_one_pickle(&mut Cursor::new(&pickle[..])).unwrap_err().to_string();
        assert!(error.contains("too large"), "{error}");
    }

    #[test]
    fn zero_strides_cannot_inflate_a_storage() {
        // One stored value viewed as a million by stride 0: refused, not a 4 MB allocation (or 4 TB).
        let error = gather_strided("t", &[1.0], 0, &[1_000_000], &[0]).unwrap_err().to_string();
        assert!(error.contains("more values"), "{error}");
        let error = gather_strided("t", &[1.0, 2.0], 0, &[usize::MAX, 2], &[0, 1]).unwrap_err().to_string();
        assert!(error.contains("overflows"), "{error}");
        assert!(gather_strided("t", &[1.0, 2.0], 1, &[2], &[usize::MAX]).is_err());
    }

    #[test]
    fn zip_storages_are_read_within_a_budget() {
        // The tiny checkpoint's storages hold 36 bytes; with a budget of 8 the first one is refused, read no
        // further than the budget (a zip bomb's declared and real sizes are both untrusted).
        let bytes = include_bytes!("../../../tests/data/tiny_zip_checkpoint.pth");
        let error = read_zip(bytes, 8).unwrap_err().to_string();
        assert!(error.contains("implausibly large"), "{error}");
        assert_eq!(read_zip(bytes, 1 << 20).unwrap().len(), 2);
    }

    #[test]
    fn foreign_global_is_refused() {
        // protocol 2: GLOBAL 'os system', EMPTY_TUPLE, REDUCE, STOP
        let pickle = b"\x80\x02cos\nsystem\n)R.";
        let mut reader = Cursor::new(&pickle[..]);
        let error = parse_one_pickle(&mut reader).unwrap_err().to_string();
        assert!(error.contains("os.system"), "{error}");
    }
}
