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
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let parsed = std::panic::catch_unwind(|| read_pth_bytes(&bytes));
    match parsed {
        Ok(result) => result.with_context(|| format!("{}: not a readable PyTorch checkpoint", path.display())),
        Err(_) => bail!("{}: malformed PyTorch checkpoint (the parser gave up)", path.display()),
    }
}

pub fn read_pth_bytes(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes)
    } else {
        read_legacy(bytes)
    }
}

/// Most objects one pickle may build. A real state dict builds a few thousand; a pickle that reuses memoised
/// objects inside themselves ("billion laughs") would otherwise exhaust memory in the interpreter, which
/// copies memo entries.
const MAX_PICKLE_OBJECTS: u64 = 10_000_000;

/// Counts (with saturation) the objects the pickle starting at `bytes` would build, without building them, and
/// refuses it past [`MAX_PICKLE_OBJECTS`]. Mirrors the opcodes candle's interpreter accepts; anything else is
/// left for the interpreter to reject.
fn check_pickle_expansion(bytes: &[u8]) -> Result<()> {
    const MARK: u64 = u64::MAX;
    let mut stack: Vec<u64> = Vec::new();
    let mut memo: HashMap<u32, u64> = HashMap::new();
    let mut position = 0usize;
    let take = |position: &mut usize, n: usize| -> Result<&[u8]> {
        let slice = bytes.get(*position..*position + n).ok_or_else(|| anyhow!("pickle: truncated"))?;
        *position += n;
        Ok(slice)
    };
    let pop = |stack: &mut Vec<u64>| stack.pop().filter(|&w| w != MARK).ok_or_else(|| anyhow!("pickle: malformed"));
    let pop_to_mark = |stack: &mut Vec<u64>| -> Result<u64> {
        let mut total = 0u64;
        loop {
            match stack.pop() {
                Some(MARK) => return Ok(total),
                Some(weight) => total = total.saturating_add(weight),
                None => bail!("pickle: missing mark"),
            }
        }
    };
    loop {
        let opcode = take(&mut position, 1)?[0];
        match opcode {
            0x80 => drop(take(&mut position, 1)?),
            b'c' => {
                for _ in 0..2 {
                    let line_end = bytes[position..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| anyhow!("pickle: truncated"))?;
                    position += line_end + 1;
                }
                stack.push(1);
            }
            b'q' => {
                let id = take(&mut position, 1)?[0] as u32;
                memo.insert(id, *stack.last().unwrap_or(&1));
            }
            b'r' => {
                let id = u32::from_le_bytes(take(&mut position, 4)?.try_into().expect("4 bytes"));
                memo.insert(id, *stack.last().unwrap_or(&1));
            }
            b'h' => {
                let id = take(&mut position, 1)?[0] as u32;
                stack.push(*memo.get(&id).unwrap_or(&1));
            }
            b'j' => {
                let id = u32::from_le_bytes(take(&mut position, 4)?.try_into().expect("4 bytes"));
                stack.push(*memo.get(&id).unwrap_or(&1));
            }
            b')' | b']' | b'}' | b'd' | 0x88 | 0x89 | b'N' => stack.push(1),
            b'(' => stack.push(MARK),
            b'X' => {
                let length = u32::from_le_bytes(take(&mut position, 4)?.try_into().expect("4 bytes")) as usize;
                take(&mut position, length)?;
                stack.push(1);
            }
            b'J' => drop(take(&mut position, 4).map(|_| stack.push(1))?),
            b'K' => drop(take(&mut position, 1).map(|_| stack.push(1))?),
            b'M' => drop(take(&mut position, 2).map(|_| stack.push(1))?),
            b'G' => drop(take(&mut position, 8).map(|_| stack.push(1))?),
            0x8a => {
                let length = take(&mut position, 1)?[0] as usize;
                take(&mut position, length)?;
                stack.push(1);
            }
            b't' => {
                let total = pop_to_mark(&mut stack)?;
                stack.push(total.saturating_add(1));
            }
            0x85..=0x87 => {
                let mut total = 1u64;
                for _ in 0..(opcode - 0x84) {
                    total = total.saturating_add(pop(&mut stack)?);
                }
                stack.push(total);
            }
            b'R' | b'b' | 0x81 => {
                let total = pop(&mut stack)?.saturating_add(pop(&mut stack)?);
                stack.push(total.saturating_add(1));
            }
            b'Q' => {
                let weight = pop(&mut stack)?;
                stack.push(weight.saturating_add(1));
            }
            b'a' | b's' | b'e' | b'u' => {
                let added = match opcode {
                    b'a' => pop(&mut stack)?,
                    b's' => pop(&mut stack)?.saturating_add(pop(&mut stack)?),
                    _ => pop_to_mark(&mut stack)?,
                };
                let target = stack.last_mut().filter(|w| **w != MARK).ok_or_else(|| anyhow!("pickle: malformed"))?;
                *target = target.saturating_add(added);
            }
            b'.' => return Ok(()),
            _ => return Ok(()),
        }
        if stack.last().is_some_and(|&w| w != MARK && w > MAX_PICKLE_OBJECTS) {
            bail!("refused: the pickle would build more than {MAX_PICKLE_OBJECTS} objects (a memory bomb?)");
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
    let count: usize = shape.iter().product();
    if count == 0 {
        return Ok(Vec::new());
    }
    let last_index = offset + shape.iter().zip(strides).map(|(&n, &s)| (n - 1) * s).sum::<usize>();
    if last_index >= storage.len() {
        bail!("{name}: its view reaches element {last_index} of a storage of {}", storage.len());
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
    for tensor in refs {
        if element_size(&tensor.storage_type).is_none() {
            bail!("{}: unsupported storage type {}", tensor.name, tensor.storage_type);
        }
        let Some(storage) = storages.get(&tensor.storage_key) else {
            // Integer storages (num_batches_tracked) are not decoded as floats.
            continue;
        };
        let data = gather_strided(&tensor.name, storage, tensor.offset, &tensor.shape, &tensor.strides)?;
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

fn read_zip(bytes: &[u8]) -> Result<Vec<(String, PthTensor)>> {
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
    for tensor in &refs {
        if storages.contains_key(&tensor.storage_key) {
            continue;
        }
        let entry = format!("{prefix}data/{}", tensor.storage_key);
        let data = read_zip_entry(&mut archive, &entry, usize::MAX)?;
        if let Some(values) = decode_floats(&tensor.storage_type, &data) {
            storages.insert(tensor.storage_key.clone(), values);
        }
    }
    build_tensors(refs, &storages)
}

fn read_zip_entry(archive: &mut zip::ZipArchive<Cursor<&[u8]>>, name: &str, limit: usize) -> Result<Vec<u8>> {
    let mut file = archive.by_name(name).with_context(|| format!("missing entry {name}"))?;
    if file.size() as usize > limit {
        bail!("entry {name} is implausibly large ({} bytes)", file.size());
    }
    let mut data = Vec::with_capacity(file.size() as usize);
    file.read_to_end(&mut data)?;
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
    fn foreign_global_is_refused() {
        // protocol 2: GLOBAL 'os system', EMPTY_TUPLE, REDUCE, STOP
        let pickle = b"\x80\x02cos\nsystem\n)R.";
        let mut reader = Cursor::new(&pickle[..]);
        let error = parse_one_pickle(&mut reader).unwrap_err().to_string();
        assert!(error.contains("os.system"), "{error}");
    }
}
