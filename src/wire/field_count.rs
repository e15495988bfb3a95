//! Counting a repeated field of protobuf messages as their bytes stream in,
//! so that a message of millions of tiny elements is refused by count before
//! it is decoded: an empty `Input` costs 2 bytes on the wire and tens once
//! decoded, so a 16 MiB message would inflate by hundreds of MB before a
//! check on the decoded request could refuse it.

/// What a method's requests hold in the repeated field that is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elements {
    /// Embed's and Predict's `inputs`.
    Inputs,
    /// TrainHead's inline `examples.examples`, an upload chunk's `examples`.
    Examples,
}

/// The counted field of `method`'s requests (a `/package.Service/Method`
/// path), by field numbers from the message's top level: the last is the
/// counted field, the ones before it the message fields it is nested in.
pub fn counted_field(method: &str) -> Option<(Elements, &'static [u32])> {
    match method {
        "/tlserve.v1.Embedder/Embed" | "/tlserve.v1.Predictor/Predict" => {
            Some((Elements::Inputs, &[2]))
        }
        "/tlserve.v1.Trainer/TrainHead" => Some((Elements::Examples, &[5, 1])),
        "/tlserve.v1.Trainer/UploadDataset" => Some((Elements::Examples, &[1])),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Reading a field's key.
    Key,
    /// Reading a length-delimited field's length; what to do with its bytes.
    Length(Bytes),
    /// Skipping a varint value.
    Varint,
    /// Skipping this many bytes.
    Skip(usize),
    /// Not protobuf as expected (or compressed): counting stops, the
    /// decoder refuses the message if it is malformed.
    Stopped,
}

#[derive(Debug, Clone, Copy)]
enum Bytes {
    Skip,
    /// A message field on the way to the counted one: its fields are read.
    Descend,
}

/// Counts the occurrences of one repeated field in each message.
#[derive(Debug, Clone)]
pub struct FieldCounter {
    path: &'static [u32],
    max: usize,
    count: usize,
    step: Step,
    varint: u64,
    shift: u32,
    /// Bytes read of the current message.
    offset: usize,
    /// Where the enclosing messages descended into end, innermost last.
    ends: Vec<usize>,
}

impl FieldCounter {
    /// Counts the field at `path` (see [`counted_field`]), at most `max` per
    /// message.
    pub fn new(path: &'static [u32], max: usize) -> Self {
        Self {
            path,
            max,
            count: 0,
            step: Step::Key,
            varint: 0,
            shift: 0,
            offset: 0,
            ends: Vec::new(),
        }
    }

    /// Starts a new message; a compressed one is not counted.
    pub fn reset(&mut self, compressed: bool) {
        self.count = 0;
        self.step = if compressed { Step::Stopped } else { Step::Key };
        self.varint = 0;
        self.shift = 0;
        self.offset = 0;
        self.ends.clear();
    }

    /// Reads the next bytes of the current message; returns the count once
    /// it passes the bound.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), usize> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.step {
                Step::Stopped => return Ok(()),
                Step::Skip(left) => {
                    let take = left.min(bytes.len());
                    self.offset += take;
                    bytes = &bytes[take..];
                    if take == left {
                        self.at_field_end();
                    } else {
                        self.step = Step::Skip(left - take);
                    }
                }
                _ => {
                    self.offset += 1;
                    bytes = rest;
                    self.read_varint_byte(byte)?;
                }
            }
        }
        Ok(())
    }

    fn read_varint_byte(&mut self, byte: u8) -> Result<(), usize> {
        self.varint |= u64::from(byte & 0x7f) << self.shift;
        self.shift += 7;
        if byte & 0x80 != 0 {
            if self.shift >= 64 {
                self.step = Step::Stopped;
            }
            return Ok(());
        }
        let value = std::mem::take(&mut self.varint);
        self.shift = 0;
        match self.step {
            Step::Key => self.key(value)?,
            Step::Length(bytes) => self.length(value, bytes),
            Step::Varint => self.at_field_end(),
            Step::Skip(_) | Step::Stopped => {}
        }
        Ok(())
    }

    fn key(&mut self, key: u64) -> Result<(), usize> {
        let depth = self.ends.len();
        let on_path = self
            .path
            .get(depth)
            .is_some_and(|&f| u64::from(f) == key >> 3);
        let counted = on_path && depth + 1 == self.path.len();
        self.step = match key & 7 {
            0 => Step::Varint,
            1 => Step::Skip(8),
            5 => Step::Skip(4),
            2 if counted => {
                self.count += 1;
                if self.count > self.max {
                    self.step = Step::Stopped;
                    return Err(self.count);
                }
                Step::Length(Bytes::Skip)
            }
            2 if on_path => Step::Length(Bytes::Descend),
            2 => Step::Length(Bytes::Skip),
            _ => Step::Stopped,
        };
        Ok(())
    }

    fn length(&mut self, length: u64, bytes: Bytes) {
        let Ok(length) = usize::try_from(length) else {
            self.step = Step::Stopped;
            return;
        };
        match bytes {
            Bytes::Skip => self.step = Step::Skip(length),
            Bytes::Descend => {
                self.ends.push(self.offset.saturating_add(length));
                self.at_field_end();
            }
        }
        if length == 0 {
            self.at_field_end();
        }
    }

    /// After a field: leaves the enclosing messages that end here.
    fn at_field_end(&mut self) {
        self.step = Step::Key;
        while let Some(&end) = self.ends.last() {
            if self.offset < end {
                return;
            }
            if self.offset > end {
                self.step = Step::Stopped;
                return;
            }
            self.ends.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto;

    fn count_in_chunks(path: &'static [u32], bytes: &[u8], chunk: usize) -> Result<(), usize> {
        let mut counter = FieldCounter::new(path, 5);
        counter.reset(false);
        bytes.chunks(chunk).try_for_each(|c| counter.feed(c))
    }

    /// A bound of 5 passes `five` and refuses `six`, cut in chunks of any size.
    fn five_pass_six_do_not(path: &'static [u32], five: &[u8], six: &[u8]) {
        for chunk in 1..=five.len() {
            assert_eq!(count_in_chunks(path, five, chunk), Ok(()), "{chunk}");
            assert_eq!(count_in_chunks(path, six, chunk), Err(6), "{chunk}");
        }
    }

    fn input(text: &str) -> proto::Input {
        proto::Input {
            kind: Some(proto::input::Kind::Text(text.into())),
        }
    }

    #[test]
    fn counts_inputs_at_the_top_level_in_any_chunking() {
        let (_, path) = counted_field("/tlserve.v1.Embedder/Embed").unwrap();
        let request = |n: usize| proto::EmbedRequest {
            backbone: "b".repeat(300),
            inputs: (0..n).map(|i| input(&"é".repeat(i * 40))).collect(),
            normalize: Some(true),
            ..Default::default()
        };
        five_pass_six_do_not(
            path,
            &request(5).encode_to_vec(),
            &request(6).encode_to_vec(),
        );
        // Empty inputs, two bytes each, count the same.
        let empty = proto::PredictRequest {
            inputs: vec![proto::Input::default(); 6],
            top_k: 3,
            ..Default::default()
        };
        assert_eq!(count_in_chunks(path, &empty.encode_to_vec(), 1), Err(6));
    }

    #[test]
    fn counts_examples_nested_in_train_head() {
        let (what, path) = counted_field("/tlserve.v1.Trainer/TrainHead").unwrap();
        assert_eq!(what, Elements::Examples);
        let request = |n: usize| proto::TrainHeadRequest {
            backbone: "b".into(),
            head_name: "h".into(),
            training: Some(proto::TrainingConfig {
                epochs: 3,
                ..Default::default()
            }),
            data: Some(proto::train_head_request::Data::Examples(
                proto::ExampleSet {
                    examples: (0..n)
                        .map(|i| proto::Example {
                            input: Some(input(&"x".repeat(i * 30))),
                            label: "l".into(),
                        })
                        .collect(),
                },
            )),
            labels: vec!["l".into(); 9],
            ..Default::default()
        };
        five_pass_six_do_not(
            path,
            &request(5).encode_to_vec(),
            &request(6).encode_to_vec(),
        );
    }

    #[test]
    fn malformed_or_compressed_bytes_stop_the_count_without_refusing() {
        let mut counter = FieldCounter::new(&[2], 1);
        counter.reset(true);
        assert_eq!(counter.feed(&[0x12, 0, 0x12, 0, 0x12, 0]), Ok(()));
        counter.reset(false);
        // A group (wire type 3) is not expected here.
        assert_eq!(counter.feed(&[0x13, 0x12, 0, 0x12, 0]), Ok(()));
        counter.reset(false);
        assert_eq!(counter.feed(&[0x12, 0, 0x12, 0]), Err(2));
    }
}
