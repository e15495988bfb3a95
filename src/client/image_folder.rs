//! Image folders in the layout of Keras' `image_dataset_from_directory` and
//! torchvision's `ImageFolder`: one subfolder per class, named as the label,
//! holding that class's images (PNG, JPEG or WebP, at any depth below it).

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use super::examples::{Example, ExampleInput};

/// What a folder holds.
#[derive(Debug, Default)]
pub struct ImageFolder {
    /// The readable images, class by class (classes and files in name order).
    pub examples: Vec<Example>,
    /// Files that are not PNG, JPEG or WebP (by extension and first bytes).
    pub skipped: usize,
    /// Image files that could not be read or decoded, with why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The encoded image formats a server accepts.
const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Whether `head` (a file's first bytes) starts a PNG, JPEG or WebP image.
pub fn is_image_magic(head: &[u8]) -> bool {
    head.starts_with(b"\x89PNG\r\n\x1a\n")
        || head.starts_with(&[0xFF, 0xD8, 0xFF])
        || (head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP")
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Whether a file is meant as an image: its extension says so, or its first
/// bytes do (an image saved without an extension).
fn looks_like_image(path: &Path) -> bool {
    if has_image_extension(path) {
        return true;
    }
    let mut head = [0u8; 12];
    let read = std::fs::File::open(path).and_then(|mut file| {
        let mut filled = 0;
        while filled < head.len() {
            match file.read(&mut head[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        Ok(filled)
    });
    read.is_ok_and(|filled| is_image_magic(&head[..filled]))
}

/// The entries of a folder in name order.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    paths.sort();
    Ok(paths)
}

/// The encoded bytes of an image file, once they decode.
fn read_image(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|err| err.to_string())?;
    image::load_from_memory(&bytes).map_err(|err| err.to_string())?;
    Ok(bytes)
}

/// Adds the images under `dir`, at any depth, as examples of `label`.
fn add_class(dir: &Path, label: &str, folder: &mut ImageFolder) -> Result<()> {
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            add_class(&path, label, folder)?;
        } else if !looks_like_image(&path) {
            folder.skipped += 1;
        } else {
            match read_image(&path) {
                Ok(bytes) => folder.examples.push(Example {
                    label: label.to_owned(),
                    input: ExampleInput::Image(bytes),
                }),
                Err(reason) => folder.unreadable.push((path, reason)),
            }
        }
    }
    Ok(())
}

/// Reads a folder of class subfolders. Files directly in `dir` belong to no
/// class and are skipped.
pub fn read(dir: &Path) -> Result<ImageFolder> {
    let mut folder = ImageFolder::default();
    for path in sorted_entries(dir)? {
        if !path.is_dir() {
            folder.skipped += 1;
            continue;
        }
        let Some(label) = path.file_name().and_then(|n| n.to_str()) else {
            bail!("the class folder {} has no UTF-8 name", path.display());
        };
        add_class(&path, label, &mut folder)?;
    }
    if folder.examples.is_empty() && folder.unreadable.is_empty() {
        bail!(
            "{} holds no images: expected one subfolder per class with PNG, JPEG or WebP files",
            dir.display()
        );
    }
    Ok(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(colour: [u8; 3]) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(4, 4, image::Rgb(colour));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("encode");
        bytes.into_inner()
    }

    #[test]
    fn magic_bytes_name_the_image_formats() {
        assert!(is_image_magic(&png([1, 2, 3])));
        assert!(is_image_magic(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(is_image_magic(b"RIFF\0\0\0\0WEBPVP8 "));
        assert!(!is_image_magic(b"RIFF\0\0\0\0WAVEfmt "));
        assert!(!is_image_magic(b"hello"));
    }

    #[test]
    fn subfolders_are_classes_and_other_files_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (class, colour) in [("red", [255, 0, 0]), ("blue", [0, 0, 255])] {
            std::fs::create_dir_all(root.join(class).join("nested")).unwrap();
            std::fs::write(root.join(class).join("a.png"), png(colour)).unwrap();
            // No extension: found by its first bytes.
            std::fs::write(root.join(class).join("nested").join("b"), png(colour)).unwrap();
        }
        std::fs::write(root.join("red").join("notes.txt"), "not an image").unwrap();
        std::fs::write(root.join("README"), "top-level files belong to no class").unwrap();
        std::fs::write(
            root.join("blue").join("broken.jpg"),
            b"\xFF\xD8\xFFtruncated",
        )
        .unwrap();

        let folder = read(root).unwrap();
        let labels: Vec<&str> = folder.examples.iter().map(|e| e.label.as_str()).collect();
        assert_eq!(labels, ["blue", "blue", "red", "red"]);
        assert_eq!(folder.skipped, 2);
        assert_eq!(folder.unreadable.len(), 1);
        assert!(folder.unreadable[0].0.ends_with("blue/broken.jpg"));
    }

    #[test]
    fn a_folder_without_images_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), png([0, 0, 0])).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("one subfolder per class"), "{err}");
        assert!(read(&dir.path().join("missing")).is_err());
    }
}
