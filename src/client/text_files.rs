//! Text example files: `LABEL<TAB>TEXT` lines, CSV with a text and a label
//! column, and JSON Lines objects with a text and a label field.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::examples::Example;

/// The layout of a text example file. `tlserve train --format` and
/// `tlserve evaluate --format` take it by its lower-case name and list the
/// names alone, as the flag's own help describes the files (each value's help
/// is reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TextFormat {
    /// `LABEL<TAB>TEXT` per line.
    #[value(help = None::<&str>)]
    Tsv,
    /// Comma-separated values, header detected.
    #[value(help = None::<&str>)]
    Csv,
    /// One JSON object per line.
    #[value(help = None::<&str>)]
    Jsonl,
}

/// A column of a CSV file or a field of a JSON object: by name, or for CSV
/// by number (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Name(String),
    Number(usize),
}

impl std::str::FromStr for Column {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a column needs a name or a number".into());
        }
        match s.parse::<usize>() {
            Ok(0) => Err("columns are numbered from 1".into()),
            Ok(number) => Ok(Self::Number(number)),
            Err(_) => Ok(Self::Name(s.to_owned())),
        }
    }
}

/// Where the text and the label of an example are; None: the defaults
/// (`text` and `label`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Columns {
    pub text: Option<Column>,
    pub label: Option<Column>,
}

impl Columns {
    fn is_default(&self) -> bool {
        self.text.is_none() && self.label.is_none()
    }
}

/// The format a file's extension names.
pub fn format_of(path: &Path) -> Result<TextFormat> {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("tsv" | "txt") => Ok(TextFormat::Tsv),
        Some("csv") => Ok(TextFormat::Csv),
        Some("jsonl" | "ndjson") => Ok(TextFormat::Jsonl),
        _ => bail!(
            "cannot tell the format of {} from its extension (.tsv, .txt, .csv, .jsonl, \
             .ndjson); pass --format tsv, csv or jsonl",
            path.display()
        ),
    }
}

/// Reads the examples of a text file, in `format` or the one its extension names.
pub fn read(path: &Path, format: Option<TextFormat>, columns: &Columns) -> Result<Vec<Example>> {
    let format = match format {
        Some(format) => format,
        None => format_of(path)?,
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let origin = path.display().to_string();
    let examples = match format {
        TextFormat::Tsv if !columns.is_default() => bail!(
            "--text-column and --label-column apply to CSV and JSON Lines files, \
             not to LABEL<TAB>TEXT lines"
        ),
        TextFormat::Tsv => parse_tsv(&text, &origin)?,
        TextFormat::Csv => parse_csv(&text, columns, &origin)?,
        TextFormat::Jsonl => parse_jsonl(&text, columns, &origin)?,
    };
    if examples.is_empty() {
        bail!("{origin} holds no examples");
    }
    Ok(examples)
}

/// `LABEL<TAB>TEXT` lines, blank lines skipped.
pub fn parse_tsv(text: &str, origin: &str) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (label, sentence) = line
            .split_once('\t')
            .with_context(|| format!("{origin} line {}: expected LABEL<TAB>TEXT", number + 1))?;
        examples.push(Example::text(label, sentence));
    }
    Ok(examples)
}

/// The name a header must hold for `column`: the one given, or `default`
/// when none is; None for a column given by number.
fn header_name<'a>(column: &'a Option<Column>, default: &'a str) -> Option<&'a str> {
    match column {
        None => Some(default),
        Some(Column::Name(name)) => Some(name),
        Some(Column::Number(_)) => None,
    }
}

/// The (text, label) column indices of a CSV file and whether its first row
/// is a header: it is when it names every column not given by number (by
/// default `text` and `label`). Without one, columns are numbers; by default
/// the label is the first and the text the second, as in `LABEL<TAB>TEXT`
/// files.
fn csv_columns(first: &csv::StringRecord, columns: &Columns) -> Result<(usize, usize, bool)> {
    let find = |name: &str| first.iter().position(|cell| cell.trim() == name);
    let names = [
        header_name(&columns.text, "text"),
        header_name(&columns.label, "label"),
    ];
    let header =
        names.iter().any(Option::is_some) && names.iter().flatten().all(|n| find(n).is_some());
    let locate = |column: &Option<Column>, name: Option<&str>, default: usize| match (
        column,
        name.filter(|_| header).and_then(find),
    ) {
        (Some(Column::Number(number)), _) => Ok(number - 1),
        (_, Some(at)) => Ok(at),
        (None, None) => Ok(default),
        (Some(Column::Name(name)), None) => bail!(
            "the first row ({}) names no column `{name}`; give --text-column and \
                 --label-column as names from the header or as column numbers (from 1)",
            first.iter().collect::<Vec<_>>().join(",")
        ),
    };
    let text = locate(&columns.text, names[0], 1)?;
    let label = locate(&columns.label, names[1], 0)?;
    Ok((text, label, header))
}

/// CSV rows; see [`csv_columns`] for how the columns are found.
pub fn parse_csv(text: &str, columns: &Columns, origin: &str) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut records = reader.records();
    let Some(first) = records.next() else {
        return Ok(Vec::new());
    };
    let first = first.with_context(|| format!("{origin}: not valid CSV"))?;
    let (text_at, label_at, header) = csv_columns(&first, columns)?;
    let rows = std::iter::once(Ok(first))
        .chain(records)
        .skip(usize::from(header));
    let mut examples = Vec::new();
    for row in rows {
        let row = row.with_context(|| format!("{origin}: not valid CSV"))?;
        let line = row.position().map_or(0, |p| p.line());
        if row.iter().all(|cell| cell.trim().is_empty()) {
            continue;
        }
        let cell = |at: usize, what: &str| {
            row.get(at).with_context(|| {
                format!("{origin} line {line}: no column {} for the {what}", at + 1)
            })
        };
        examples.push(Example::text(
            cell(label_at, "label")?,
            cell(text_at, "text")?,
        ));
    }
    Ok(examples)
}

/// A JSON object's field as a label: a string, or a number or boolean
/// written as text.
fn label_of(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The field name a JSON Lines column names.
fn field_name(column: &Option<Column>, default: &str) -> Result<String> {
    match column {
        None => Ok(default.to_owned()),
        Some(Column::Name(name)) => Ok(name.clone()),
        Some(Column::Number(number)) => {
            bail!("JSON Lines fields are named, not numbered (got {number})")
        }
    }
}

/// One JSON object per non-blank line.
pub fn parse_jsonl(text: &str, columns: &Columns, origin: &str) -> Result<Vec<Example>> {
    let text_field = field_name(&columns.text, "text")?;
    let label_field = field_name(&columns.label, "label")?;
    let mut examples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{origin} line {}", number + 1);
        let object: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Some(sentence) = object.get(&text_field).and_then(|v| v.as_str()) else {
            bail!("{}: no string field `{text_field}`", at());
        };
        let Some(label) = object.get(&label_field).and_then(label_of) else {
            bail!("{}: no string or number field `{label_field}`", at());
        };
        examples.push(Example::text(&label, sentence));
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(examples: &[Example]) -> Vec<(String, String)> {
        examples
            .iter()
            .map(|e| match &e.input {
                super::super::examples::ExampleInput::Text(t) => (e.label.clone(), t.clone()),
                other => panic!("not a text: {other:?}"),
            })
            .collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(l, t)| (l.to_string(), t.to_string()))
            .collect()
    }

    fn columns(text: &str, label: &str) -> Columns {
        Columns {
            text: Some(text.parse().unwrap()),
            label: Some(label.parse().unwrap()),
        }
    }

    #[test]
    fn formats_follow_the_extension() {
        assert_eq!(format_of(Path::new("a.TSV")).unwrap(), TextFormat::Tsv);
        assert_eq!(format_of(Path::new("a.csv")).unwrap(), TextFormat::Csv);
        assert_eq!(format_of(Path::new("a.ndjson")).unwrap(), TextFormat::Jsonl);
        let err = format_of(Path::new("a.xlsx")).unwrap_err().to_string();
        assert!(err.contains("--format"), "{err}");
    }

    #[test]
    fn tab_separated_lines_keep_tabs_in_the_text() {
        let got = parse_tsv("a\tone\n\nb\ttwo\tthree\n", "f").unwrap();
        assert_eq!(pairs(&got), owned(&[("a", "one"), ("b", "two\tthree")]));
        let err = parse_tsv("a\tone\nno tab\n", "f").unwrap_err().to_string();
        assert!(err.contains("f line 2"), "{err}");
    }

    #[test]
    fn csv_headers_are_detected_and_columns_found_by_name() {
        let text = "id,label,text\n1,pos,\"good, really\"\n2,neg,\"bad\nfilm\"\n";
        let got = parse_csv(text, &Columns::default(), "f").unwrap();
        assert_eq!(
            pairs(&got),
            owned(&[("pos", "good, really"), ("neg", "bad\nfilm")])
        );
        let text = "review,sentiment\ngreat,pos\n";
        let got = parse_csv(text, &columns("review", "sentiment"), "f").unwrap();
        assert_eq!(pairs(&got), owned(&[("pos", "great")]));
    }

    #[test]
    fn csv_without_a_header_is_label_then_text_or_numbered_columns() {
        let got = parse_csv("pos,great film\nneg,dull\n", &Columns::default(), "f").unwrap();
        assert_eq!(
            pairs(&got),
            owned(&[("pos", "great film"), ("neg", "dull")])
        );
        let got = parse_csv("x,great,pos\n", &columns("2", "3"), "f").unwrap();
        assert_eq!(pairs(&got), owned(&[("pos", "great")]));
    }

    #[test]
    fn csv_errors_name_the_problem() {
        let err = parse_csv("a,b\n1,2\n", &columns("review", "label"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column `review`"), "{err}");
        let err = parse_csv("pos\n", &Columns::default(), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no column 2 for the text"), "{err}");
    }

    #[test]
    fn json_lines_take_named_fields_and_number_labels() {
        let text =
            "{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": 0}\n";
        let got = parse_jsonl(text, &Columns::default(), "f").unwrap();
        assert_eq!(pairs(&got), owned(&[("pos", "good"), ("0", "bad")]));
        let got = parse_jsonl(
            "{\"review\": \"fine\", \"stars\": 4}\n",
            &columns("review", "stars"),
            "f",
        )
        .unwrap();
        assert_eq!(pairs(&got), owned(&[("4", "fine")]));
        let err = parse_jsonl(
            "{\"text\": 3, \"label\": \"a\"}\n",
            &Columns::default(),
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("line 1: no string field `text`"), "{err}");
        let err = parse_jsonl("{nope\n", &Columns::default(), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn columns_parse_names_and_numbers_from_one() {
        assert_eq!("3".parse::<Column>().unwrap(), Column::Number(3));
        assert_eq!(
            "text".parse::<Column>().unwrap(),
            Column::Name("text".into())
        );
        assert!("0".parse::<Column>().is_err());
    }
}
