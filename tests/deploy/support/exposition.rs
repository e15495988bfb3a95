//! The server's Prometheus text exposition, parsed by the `prometheus-parse`
//! crate and grouped into metric families: each family's type, the series
//! names it exports and the values seen for each of its labels.

use std::collections::{BTreeMap, BTreeSet};

use prometheus_parse::{Scrape, Value};

#[derive(Default, Debug)]
pub struct Family {
    /// counter, gauge, histogram, summary or untyped.
    pub kind: String,
    /// label name -> values seen
    pub labels: BTreeMap<String, BTreeSet<String>>,
    /// The series names: `name`, or `name_bucket`, `name_sum`, `name_count`.
    pub samples: BTreeSet<String>,
}

/// A bucket bound or quantile as the exposition writes it.
fn label_number(value: f64) -> String {
    if value == f64::INFINITY {
        "+Inf".to_owned()
    } else {
        value.to_string()
    }
}

/// The metric families of a Prometheus text exposition.
pub fn parse_exposition(body: &str) -> BTreeMap<String, Family> {
    let scrape = Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))
        .unwrap_or_else(|err| panic!("the exposition does not parse ({err}):\n{body}"));
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    // The crate folds a histogram's `_bucket` series (a summary's quantiles)
    // into one sample of the family; their `_sum` and `_count` series come as
    // untyped samples of their own, attributed below once the kinds are known.
    for sample in &scrape.samples {
        let (kind, series, bound) = match &sample.value {
            Value::Counter(_) => ("counter", sample.metric.clone(), None),
            Value::Gauge(_) => ("gauge", sample.metric.clone(), None),
            Value::Untyped(_) => continue,
            Value::Histogram(buckets) => (
                "histogram",
                format!("{}_bucket", sample.metric),
                Some((
                    "le",
                    buckets.iter().map(|b| b.less_than).collect::<Vec<_>>(),
                )),
            ),
            Value::Summary(quantiles) => (
                "summary",
                sample.metric.clone(),
                Some((
                    "quantile",
                    quantiles.iter().map(|q| q.quantile).collect::<Vec<_>>(),
                )),
            ),
        };
        let family = families.entry(sample.metric.clone()).or_default();
        family.kind = kind.to_owned();
        family.samples.insert(series);
        for (key, value) in sample.labels.iter() {
            family
                .labels
                .entry(key.clone())
                .or_default()
                .insert(value.clone());
        }
        if let Some((label, values)) = bound {
            family
                .labels
                .entry(label.to_owned())
                .or_default()
                .extend(values.into_iter().map(label_number));
        }
    }
    for sample in &scrape.samples {
        if !matches!(sample.value, Value::Untyped(_)) {
            continue;
        }
        let name = ["_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.metric.strip_suffix(suffix))
            .find(|base| {
                families
                    .get(*base)
                    .is_some_and(|f| f.kind == "histogram" || f.kind == "summary")
            })
            .unwrap_or(&sample.metric)
            .to_owned();
        let family = families.entry(name).or_default();
        if family.kind.is_empty() {
            family.kind = "untyped".to_owned();
        }
        family.samples.insert(sample.metric.clone());
        for (key, value) in sample.labels.iter() {
            family
                .labels
                .entry(key.clone())
                .or_default()
                .insert(value.clone());
        }
    }
    families
}
