//! Reads PyTorch's legacy (pre-1.6, non-zip) `.pth` format, which candle's own
//! readers do not open: they expect the zip layout.
//!
//! The legacy file is five pickles in a row — a magic number, the protocol
//! version, system info, the object itself (here a state dict whose tensors
//! refer to storages by key), and the list of storage keys — followed, for each
//! key in that order, by the storage as a little-endian u64 element count and the
//! raw little-endian elements. Tensors may be strided views of their storage
//! (channels-last convolution weights, transposed matrices); they are gathered
//! into contiguous tensors here.

use std::{
    collections::HashMap,
    io::{Cursor, Read},
    path::Path,
};

use candle_core::{pickle, DType, Device, Tensor};

use crate::{Error, Result};

/// The first pickle of every legacy file: protocol 2, LONG1 of 10 bytes holding
/// torch's magic number 0x1950a86a20f9469cfc6c, STOP.
const MAGIC_PICKLE: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
];

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::ModelLoad(format!("{}: {what}", path.display()))
}

fn read_pickle(cursor: &mut Cursor<&[u8]>, path: &Path) -> Result<pickle::Object> {
    let mut stack = pickle::Stack::empty();
    stack
        .read_loop(cursor)
        .and_then(|()| stack.finalize())
        .map_err(|err| bad(path, format!("not a legacy PyTorch file ({err})")))
}

/// Every tensor of the state dict in the file, contiguous, with its name.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|err| bad(path, err))?;
    if !bytes.starts_with(&MAGIC_PICKLE) {
        return Err(bad(
            path,
            "not a legacy PyTorch file (magic number missing); zip-format files load directly",
        ));
    }
    let mut cursor = Cursor::new(&bytes[..]);
    cursor.set_position(MAGIC_PICKLE.len() as u64);
    let _protocol_version = read_pickle(&mut cursor, path)?;
    let _sys_info = read_pickle(&mut cursor, path)?;
    let state = read_pickle(&mut cursor, path)?;
    let keys = storage_keys(read_pickle(&mut cursor, path)?, path)?;
    let infos = tensor_infos(state, path)?;
    let storages = read_storages(&mut cursor, &bytes, keys, &infos, path)?;
    assemble(infos, &storages, path)
}

/// The list of storage keys that follows the state dict.
fn storage_keys(object: pickle::Object, path: &Path) -> Result<Vec<String>> {
    match object {
        pickle::Object::List(keys) => keys
            .into_iter()
            .map(|k| {
                k.unicode()
                    .map_err(|_| bad(path, "a storage key is not a string"))
            })
            .collect(),
        other => Err(bad(
            path,
            format!("expected the storage key list, got {other:?}"),
        )),
    }
}

/// Name, element type, layout and storage of each tensor of the state dict.
fn tensor_infos(state: pickle::Object, path: &Path) -> Result<Vec<pickle::TensorInfo>> {
    let pickle::Object::Dict(entries) = state else {
        return Err(bad(path, "the file does not hold a state dict"));
    };
    let mut infos = Vec::new();
    for (name, value) in entries {
        if let Some(info) = value
            .into_tensor_info(name, Path::new(""))
            .map_err(|err| bad(path, err))?
        {
            infos.push(info);
        }
    }
    Ok(infos)
}

/// The raw bytes of each storage; they follow the pickles, in key order.
fn read_storages<'a>(
    cursor: &mut Cursor<&'a [u8]>,
    bytes: &'a [u8],
    keys: Vec<String>,
    infos: &[pickle::TensorInfo],
    path: &Path,
) -> Result<HashMap<String, &'a [u8]>> {
    // Storage key -> element type, from the tensors that use it.
    let dtypes: HashMap<String, DType> = infos
        .iter()
        .map(|info| (storage_key(&info.path), info.dtype))
        .collect();
    let mut storages = HashMap::new();
    for key in keys {
        let mut count = [0u8; 8];
        cursor
            .read_exact(&mut count)
            .map_err(|_| bad(path, format!("storage {key} is cut short")))?;
        let count = u64::from_le_bytes(count) as usize;
        let dtype = *dtypes
            .get(&key)
            .ok_or_else(|| bad(path, format!("storage {key} is used by no tensor")))?;
        let start = cursor.position() as usize;
        let end = count
            .checked_mul(dtype.size_in_bytes())
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| bad(path, format!("storage {key} runs past the end of the file")))?;
        storages.insert(key, &bytes[start..end]);
        cursor.set_position(end as u64);
    }
    Ok(storages)
}

/// Each tensor gathered from its storage into contiguous layout.
fn assemble(
    infos: Vec<pickle::TensorInfo>,
    storages: &HashMap<String, &[u8]>,
    path: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(infos.len());
    for info in infos {
        let storage = storages
            .get(&storage_key(&info.path))
            .ok_or_else(|| bad(path, format!("tensor {} has no storage", info.name)))?;
        let element = info.dtype.size_in_bytes();
        let dims = info.layout.dims().to_vec();
        let data = gather(
            storage,
            element,
            &dims,
            info.layout.stride(),
            info.layout.start_offset(),
        )
        .ok_or_else(|| {
            bad(
                path,
                format!("tensor {} lies outside its storage", info.name),
            )
        })?;
        let tensor = Tensor::from_raw_buffer(&data, info.dtype, &dims, &Device::Cpu)
            .map_err(|err| bad(path, err))?;
        tensors.push((info.name, tensor));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// candle names a storage `<dir>/<key>`; the dir is empty here.
fn storage_key(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_owned()
}

/// Copies a strided view (`start` in bytes, `strides` in elements) into
/// row-major order; None when any element falls outside the storage.
fn gather(
    storage: &[u8],
    element: usize,
    dims: &[usize],
    strides: &[usize],
    start: usize,
) -> Option<Vec<u8>> {
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count * element);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let offset = start + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>() * element;
        out.extend_from_slice(storage.get(offset..offset + element)?);
        // Advance the multi-index, last dimension fastest.
        for axis in (0..dims.len()).rev() {
            index[axis] += 1;
            if index[axis] < dims[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Some(out)
}

/// Converts a legacy `.pth` state dict into a safetensors file.
pub fn convert_to_safetensors(input: &Path, output: &Path) -> Result<usize> {
    let tensors: HashMap<String, Tensor> = read(input)?.into_iter().collect();
    let count = tensors.len();
    candle_core::safetensors::save(&tensors, output)
        .map_err(|err| Error::ModelLoad(format!("cannot write {}: {err}", output.display())))?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_reads_transposed_and_offset_views() {
        // Storage 0..6 as u8 elements; view 2x3 transposed from a 3x2 layout.
        let storage: Vec<u8> = (0..6).collect();
        let transposed = gather(&storage, 1, &[2, 3], &[1, 2], 0).unwrap();
        assert_eq!(transposed, vec![0, 2, 4, 1, 3, 5]);
        let offset = gather(&storage, 1, &[2], &[1], 4).unwrap();
        assert_eq!(offset, vec![4, 5]);
        assert!(
            gather(&storage, 1, &[4], &[2], 0).is_none(),
            "outside the storage"
        );
        let scalar = gather(&storage, 2, &[], &[], 2).unwrap();
        assert_eq!(scalar, vec![2, 3]);
    }

    #[test]
    fn other_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pth");
        std::fs::write(&path, b"PK\x03\x04 a zip file").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("magic number"), "{err}");
    }
}
