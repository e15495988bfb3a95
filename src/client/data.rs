//! Where a command's labelled examples come from: an image folder or a text
//! file; what was skipped or unreadable is reported on standard error.

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::{
    examples::Example,
    image_folder,
    text_files::{self, Columns, TextFormat},
};

/// A set of labelled examples on disk.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// One subfolder per class; `skip_bad` leaves out unreadable images
    /// instead of stopping.
    Images { dir: PathBuf, skip_bad: bool },
    /// A text file in `format`, or the one its extension names.
    Text {
        path: PathBuf,
        format: Option<TextFormat>,
        columns: Columns,
    },
}

/// Reads the examples of `source`.
pub fn load(source: &DataSource) -> Result<Vec<Example>> {
    match source {
        DataSource::Text {
            path,
            format,
            columns,
        } => text_files::read(path, *format, columns),
        DataSource::Images { dir, skip_bad } => {
            let folder = image_folder::read(dir)?;
            if folder.skipped > 0 {
                eprintln!(
                    "skipped {} files that are not PNG, JPEG or WebP images in a class folder",
                    folder.skipped
                );
            }
            for (path, reason) in &folder.unreadable {
                eprintln!("unreadable image {}: {reason}", path.display());
            }
            match (folder.unreadable.len(), skip_bad) {
                (0, _) => {}
                (bad, true) => eprintln!("left out {bad} unreadable images (--skip-bad)"),
                (bad, false) => bail!(
                    "{bad} images in {} cannot be read (listed above); fix or remove them, \
                     or pass --skip-bad to go on without them",
                    dir.display()
                ),
            }
            if folder.examples.is_empty() {
                bail!("no readable images in {}", dir.display());
            }
            Ok(folder.examples)
        }
    }
}
