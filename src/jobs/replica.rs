//! One replica name, one live process. A replica's name is the owner written
//! in its jobs' records, and a replica takes the unended jobs recorded under
//! its own name for its earlier run's, at once: two live processes under one
//! name (two servers on one host, both named after `HOSTNAME`) would take
//! each other's running jobs over within seconds.
//!
//! ```text
//! replicas/<name>.json   the process holding the name: a random nonce of
//!                        its start, a renewal count, and where it runs
//! ```
//!
//! A process claims its name at start and renews the record every sixth of
//! the job lease. The claim succeeds when no record is there, or when the
//! record's process is provably gone: on the same machine and in the same
//! PID namespace (same boot id, same namespace), its PID no longer runs the
//! process that started at the recorded time; elsewhere, its renewal count
//! did not change for a whole lease, as this process's monotonic clock
//! measures it (no wall clock of another machine is compared). A live holder
//! makes the start fail with [`Error::FailedPrecondition`] naming the clash.
//! A clean shutdown removes the record, so a restart needs no wait; after a
//! crash, a restart on another PID namespace (a new container) waits up to a
//! lease.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    storage::{Storage, Version, Versioned},
    sync::lock,
    Error, Result,
};

fn key(name: &str) -> String {
    format!("replicas/{name}.json")
}

/// The record of the process holding a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Holder {
    nonce: String,
    renewals: u64,
    /// Where it runs; None where that cannot be told (not Linux).
    process: Option<Process>,
}

/// A process, as the kernel names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Process {
    boot_id: String,
    pid_namespace: String,
    pid: u32,
    /// Its start, in clock ticks since boot (`/proc/<pid>/stat`): a PID
    /// reused by another process has another.
    started: u64,
}

impl Process {
    fn this() -> Option<Self> {
        let pid = std::process::id();
        Some(Self {
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()?
                .trim()
                .to_owned(),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .ok()?
                .to_string_lossy()
                .into_owned(),
            pid,
            started: started(pid)?,
        })
    }

    /// Whether it still runs: None when it lives on another machine or in
    /// another PID namespace, where this one cannot look.
    fn alive(&self) -> Option<bool> {
        let here = Process::this()?;
        if (&here.boot_id, &here.pid_namespace) != (&self.boot_id, &self.pid_namespace) {
            return None;
        }
        Some(started(self.pid) == Some(self.started))
    }
}

/// When process `pid` started, in clock ticks since boot; None when no such
/// process runs.
fn started(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the fields after the parenthesised command name start at 3.
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's hold on its replica name.
pub struct ReplicaName {
    storage: Storage,
    name: String,
    lease: Duration,
    holder: Mutex<Holder>,
    /// The version of the record this process last wrote.
    version: Mutex<Option<Version>>,
}

/// How many times a start reads the record again when another process
/// wrote it between a read and a write.
const CLAIM_TRIES: usize = 8;

impl ReplicaName {
    /// Claims `name` in the store for this process, whose jobs' leases are
    /// `lease`; refuses while another live process holds it.
    pub async fn claim(storage: Storage, name: &str, lease: Duration) -> Result<Arc<Self>> {
        let claim = Self {
            storage,
            name: name.to_owned(),
            lease,
            holder: Mutex::new(Holder {
                nonce: uuid::Uuid::new_v4().to_string(),
                renewals: 0,
                process: Process::this(),
            }),
            version: Mutex::new(None),
        };
        for _ in 0..CLAIM_TRIES {
            let current = claim.storage.get_versioned(&key(name)).await?;
            let claimed = match current {
                None => claim.create().await?,
                Some(current) => match claim.judge(current).await? {
                    Some(stale) => claim.replace(&stale).await?,
                    None => continue,
                },
            };
            if claimed {
                return Ok(Arc::new(claim));
            }
        }
        Err(Error::Storage(format!(
            "cannot claim replica name `{name}`: its record kept changing"
        )))
    }

    fn encoded(&self) -> Result<Bytes> {
        serde_json::to_vec(&*lock(&self.holder))
            .map(Bytes::from)
            .map_err(|err| Error::Internal(err.to_string()))
    }

    async fn create(&self) -> Result<bool> {
        if !self
            .storage
            .create(&key(&self.name), self.encoded()?)
            .await?
        {
            return Ok(false);
        }
        self.remember_version().await
    }

    async fn replace(&self, stale: &Version) -> Result<bool> {
        if !self
            .storage
            .update(&key(&self.name), self.encoded()?, stale)
            .await?
        {
            return Ok(false);
        }
        self.remember_version().await
    }

    /// Reads back the record this process just wrote, for its next renewal.
    async fn remember_version(&self) -> Result<bool> {
        let nonce = lock(&self.holder).nonce.clone();
        let Some(read) = self.storage.get_versioned(&key(&self.name)).await? else {
            return Ok(false);
        };
        if parse(&read.bytes).is_none_or(|holder| holder.nonce != nonce) {
            return Ok(false);
        }
        *lock(&self.version) = Some(read.version);
        Ok(true)
    }

    /// The version to replace when the record's process is gone; an error
    /// when it lives; None when the record changed while watched without
    /// telling (removed): read it again.
    async fn judge(&self, current: Versioned) -> Result<Option<Version>> {
        let Some(holder) = parse(&current.bytes) else {
            return Ok(Some(current.version));
        };
        match holder.process.as_ref().and_then(Process::alive) {
            Some(true) => return Err(self.clash(&holder)),
            Some(false) => return Ok(Some(current.version)),
            None => {}
        }
        // Elsewhere: alive if it renews within a lease, by this clock.
        let since = Instant::now();
        let every = (self.lease / 6).max(Duration::from_millis(50));
        while since.elapsed() < self.lease + every {
            tokio::time::sleep(every).await;
            match self.storage.get_versioned(&key(&self.name)).await? {
                None => return Ok(None),
                Some(now) if now.bytes != current.bytes => {
                    let holder = parse(&now.bytes).unwrap_or(holder);
                    return Err(self.clash(&holder));
                }
                Some(_) => {}
            }
        }
        Ok(Some(current.version))
    }

    fn clash(&self, holder: &Holder) -> Error {
        let place = match &holder.process {
            Some(process) => format!(" (PID {} on boot {})", process.pid, process.boot_id),
            None => String::new(),
        };
        Error::FailedPrecondition(format!(
            "another live process{place} already uses replica name `{}` on this store; two \
             servers sharing a store would take each other's jobs over. Give each its own \
             name (server.replica_id, or TLSERVE__SERVER__REPLICA_ID), or stop the other",
            self.name
        ))
    }

    /// Renews the record every sixth of the lease while `self` lives. If
    /// another process took the name (this one was paused past its lease and
    /// taken for gone), logs it and stops renewing.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let every = (self.lease / 6).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(name) = weak.upgrade() else { return };
                match name.renew().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(replica = %name.name,
                            "another process took this replica's name (this one was paused \
                             past its lease); it no longer renews it");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot renew the replica's name")
                    }
                }
            }
        })
    }

    /// One renewal; false when the record is no longer this process's.
    async fn renew(&self) -> Result<bool> {
        let Some(version) = lock(&self.version).clone() else {
            return Ok(false);
        };
        lock(&self.holder).renewals += 1;
        self.replace(&version).await
    }

    /// Gives the name up (a clean shutdown): the record goes, if it is
    /// still this process's.
    pub async fn release(&self) {
        let nonce = lock(&self.holder).nonce.clone();
        let key = key(&self.name);
        let mine = match self.storage.get(&key).await {
            Ok(Some(bytes)) => parse(&bytes).is_some_and(|holder| holder.nonce == nonce),
            _ => false,
        };
        if mine {
            if let Err(err) = self.storage.delete(&key).await {
                tracing::warn!(error = %err, "cannot give the replica's name up");
            }
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Holder> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Location;

    fn storage(dir: &std::path::Path) -> Storage {
        Storage::open(&Location::Volume(dir.to_owned())).unwrap()
    }

    /// A second claim of a live process's name is refused at once on the
    /// same machine; once the first gives it up, it is free.
    #[tokio::test]
    async fn a_live_name_is_refused_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let lease = Duration::from_secs(30);
        let first = ReplicaName::claim(storage(dir.path()), "r", lease)
            .await
            .unwrap();
        let started = Instant::now();
        let second = ReplicaName::claim(storage(dir.path()), "r", lease).await;
        assert!(matches!(second, Err(Error::FailedPrecondition(m)) if m.contains("`r`")));
        assert!(started.elapsed() < Duration::from_secs(5), "no wait here");
        assert!(first.renew().await.unwrap());
        first.release().await;
        ReplicaName::claim(storage(dir.path()), "r", lease)
            .await
            .unwrap();
    }

    /// A holder on another machine is judged by its renewals: one that
    /// renews is live, one that does not for a lease is gone, and a process
    /// of this machine that no longer runs is gone at once.
    #[tokio::test]
    async fn holders_elsewhere_are_judged_by_their_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let store = storage(dir.path());
        let lease = Duration::from_millis(600);
        let elsewhere = Holder {
            nonce: "n".into(),
            renewals: 0,
            process: None,
        };
        let put = {
            let store = store.clone();
            move |holder: Holder| {
                let store = store.clone();
                async move {
                    let json = serde_json::to_vec(&holder).unwrap();
                    store.put(&key("r"), Bytes::from(json)).await.unwrap();
                }
            }
        };
        put(elsewhere.clone()).await;
        let renewing = {
            let put = put.clone();
            let elsewhere = elsewhere.clone();
            tokio::spawn(async move {
                for renewals in 1.. {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    put(Holder {
                        renewals,
                        ..elsewhere.clone()
                    })
                    .await;
                }
            })
        };
        let live = ReplicaName::claim(store.clone(), "r", lease).await;
        assert!(matches!(live, Err(Error::FailedPrecondition(_))));
        renewing.abort();
        let _ = renewing.await;
        let started = Instant::now();
        ReplicaName::claim(store.clone(), "r", lease).await.unwrap();
        assert!(started.elapsed() >= lease, "waited a lease");

        let mut gone = Process::this().expect("Linux");
        gone.started += 1;
        put(Holder {
            process: Some(gone),
            ..elsewhere
        })
        .await;
        let started = Instant::now();
        ReplicaName::claim(store, "r", lease).await.unwrap();
        assert!(
            started.elapsed() < lease,
            "no wait for a process known gone"
        );
    }
}
