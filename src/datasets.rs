//! Uploaded training sets, kept in memory until a job uses them or they expire,
//! so large sets reach TrainHead in chunks instead of one giant message.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use crate::{jobs::Example, Error, Result};

pub struct Dataset {
    pub id: String,
    pub examples: Vec<Example>,
    pub label_counts: BTreeMap<String, u64>,
    pub expires_at: SystemTime,
    expires: Instant,
}

pub struct DatasetStore {
    datasets: Mutex<HashMap<String, Arc<Dataset>>>,
    ttl: Duration,
    max_datasets: usize,
}

impl DatasetStore {
    pub fn new(ttl: Duration, max_datasets: usize) -> Self {
        Self {
            datasets: Mutex::new(HashMap::new()),
            ttl,
            max_datasets,
        }
    }

    /// The map with expired datasets dropped.
    fn live(&self) -> MutexGuard<'_, HashMap<String, Arc<Dataset>>> {
        let mut datasets = crate::sync::lock(&self.datasets);
        let now = Instant::now();
        datasets.retain(|_, d| d.expires > now);
        datasets
    }

    /// Keeps a complete upload and returns it.
    pub fn insert(&self, examples: Vec<Example>) -> Result<Arc<Dataset>> {
        let mut datasets = self.live();
        if datasets.len() >= self.max_datasets {
            return Err(Error::LimitExceeded(format!(
                "{} uploaded datasets are waiting to be used (heads.max_datasets); \
                 use or let them expire first",
                datasets.len()
            )));
        }
        let mut label_counts = BTreeMap::new();
        for example in &examples {
            *label_counts.entry(example.label.clone()).or_default() += 1;
        }
        let dataset = Arc::new(Dataset {
            id: uuid::Uuid::new_v4().to_string(),
            examples,
            label_counts,
            expires_at: SystemTime::now() + self.ttl,
            expires: Instant::now() + self.ttl,
        });
        datasets.insert(dataset.id.clone(), Arc::clone(&dataset));
        Ok(dataset)
    }

    /// Puts back a dataset that [`DatasetStore::take`] returned, for a job that
    /// was refused: the client may retry with the same id. It keeps its slot
    /// and expiry time.
    pub fn restore(&self, dataset: Arc<Dataset>) {
        self.live().insert(dataset.id.clone(), dataset);
    }

    /// Removes and returns a dataset: each upload trains one job.
    pub fn take(&self, id: &str) -> Result<Arc<Dataset>> {
        self.live().remove(id).ok_or_else(|| Error::NotFound {
            kind: "dataset",
            id: id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backbone::Input;

    fn example(label: &str) -> Example {
        Example {
            input: Input::Text("x".into()),
            label: label.into(),
        }
    }

    #[test]
    fn datasets_are_counted_taken_once_and_expire() {
        let store = DatasetStore::new(Duration::from_secs(60), 2);
        let d = store
            .insert(vec![example("a"), example("b"), example("a")])
            .unwrap();
        assert_eq!(d.label_counts["a"], 2);
        assert_eq!(store.take(&d.id).unwrap().examples.len(), 3);
        assert!(store.take(&d.id).is_err());

        store.insert(vec![example("a")]).unwrap();
        store.insert(vec![example("a")]).unwrap();
        assert!(matches!(
            store.insert(vec![example("a")]),
            Err(Error::LimitExceeded(_))
        ));

        let short = DatasetStore::new(Duration::ZERO, 2);
        let d = short.insert(vec![example("a")]).unwrap();
        assert!(short.take(&d.id).is_err());
    }
}
