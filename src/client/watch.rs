//! Following a training job's events: progress on standard error, the head
//! at the end, and Ctrl-C to cancel the job or leave it running.

use std::io::IsTerminal;

use anyhow::{bail, Result};
use tonic::{transport::Channel, Streaming};

use super::{describe, progress::StatusLine};
use crate::proto::{self, trainer_client::TrainerClient, JobState};

/// The user stopped watching; the job runs on.
#[derive(Debug)]
pub struct Detached {
    pub job_id: String,
}

impl std::fmt::Display for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped watching; job {id} keeps running. Re-attach with: tlserve watch {id}",
            id = self.job_id
        )
    }
}

impl std::error::Error for Detached {}

/// SIGINT, caught from the moment this exists so that none is missed
/// between two events.
struct Interrupts {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn new() -> Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What to do with a job when its watcher is interrupted.
#[derive(Debug, PartialEq)]
enum Choice {
    Cancel,
    Leave,
}

/// Asks on the terminal whether to cancel the job. Without a terminal to
/// answer on, or on a second Ctrl-C, the job is left running.
async fn choose(job_id: &str, interrupts: &mut Interrupts) -> Choice {
    if !std::io::stdin().is_terminal() {
        return Choice::Leave;
    }
    eprint!("cancel job {job_id}? [y/N] ");
    let (answer, answered) = tokio::sync::oneshot::channel();
    // A plain thread, not the blocking pool: the runtime would wait for a
    // read that never ends before it lets the process exit.
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = answer.send(line);
    });
    tokio::select! {
        line = answered => match line {
            Ok(line) if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") => {
                Choice::Cancel
            }
            _ => Choice::Leave,
        },
        () = interrupts.next() => Choice::Leave,
    }
}

/// A job's progress as one line.
fn progress_line(event: &proto::TrainEvent) -> String {
    match event.state() {
        JobState::Queued => "queued".to_owned(),
        JobState::Embedding => {
            format!("embedding {}/{} inputs", event.embedded, event.total_inputs)
        }
        JobState::Training => {
            if let Some(loss) = event.step_loss {
                return format!(
                    "step {}/{}: batch loss {loss:.4} (epoch {} of {} done)",
                    event.step, event.total_steps, event.epoch, event.total_epochs
                );
            }
            // The first TRAINING event announces the stage, before any step.
            let Some(m) = event.metrics else {
                return format!("training ({} steps planned)", event.total_epochs);
            };
            let mut line = format!(
                "epoch {}/{}: loss {:.4}, accuracy {:.3}",
                event.epoch, event.total_epochs, m.train_loss, m.train_accuracy
            );
            if let (Some(loss), Some(accuracy)) = (m.validation_loss, m.validation_accuracy) {
                line += &format!(", validation loss {loss:.4}, validation accuracy {accuracy:.3}");
            }
            line
        }
        state => state.as_str_name().to_owned(),
    }
}

/// Whether a log shows this training event: every epoch, and a fine-tuning
/// step now and then.
fn logged_step(event: &proto::TrainEvent) -> bool {
    event.step_loss.is_none() || event.step.is_multiple_of(25) || event.step == event.total_steps
}

/// Shows one event; returns the head once the job has succeeded, an error
/// once it has failed or been cancelled.
fn show(
    event: proto::TrainEvent,
    status: &mut StatusLine,
    last: &mut JobState,
) -> Option<Result<proto::HeadInfo>> {
    let state = event.state();
    match state {
        JobState::Succeeded => {
            status.println("done");
            return Some(
                event
                    .head
                    .ok_or_else(|| anyhow::anyhow!("the job succeeded without a head")),
            );
        }
        JobState::Failed | JobState::Cancelled => {
            status.end();
            return Some(Err(anyhow::anyhow!(
                "job {} {}: {}",
                event.job_id,
                if state == JobState::Failed {
                    "failed"
                } else {
                    "was cancelled"
                },
                event.error
            )));
        }
        _ => {}
    }
    let line = progress_line(&event);
    if status.is_terminal() {
        status.update(&line);
    } else if state != *last || (state == JobState::Training && logged_step(&event)) {
        // In a log: each new stage and each epoch, not every embedding step,
        // and every 25th fine-tuning step.
        status.println(&line);
    }
    *last = state;
    None
}

/// Follows a job's events to its end and returns the published head.
/// Ctrl-C asks whether to cancel the job (without a terminal: leaves it
/// running) and, when it is left running, ends with [`Detached`].
pub async fn follow(
    channel: Channel,
    mut events: Streaming<proto::TrainEvent>,
) -> Result<proto::HeadInfo> {
    let mut interrupts = Interrupts::new()?;
    let mut status = StatusLine::stderr();
    let mut job_id: Option<String> = None;
    let mut last = JobState::Unspecified;
    let mut cancelling = false;
    loop {
        tokio::select! {
            message = events.message() => {
                let Some(event) = message.map_err(describe)? else {
                    bail!("the event stream ended before the job did");
                };
                if job_id.is_none() {
                    status.println(&format!("job {} (Ctrl-C to cancel it or leave it running)", event.job_id));
                    job_id = Some(event.job_id.clone());
                }
                if let Some(end) = show(event, &mut status, &mut last) {
                    return end;
                }
            }
            () = interrupts.next() => {
                status.end();
                let Some(id) = job_id.clone() else {
                    bail!("interrupted before the server named the job");
                };
                if cancelling || choose(&id, &mut interrupts).await == Choice::Leave {
                    return Err(Detached { job_id: id }.into());
                }
                cancel(channel.clone(), &id).await?;
                status.println(&format!("cancelling job {id}"));
                cancelling = true;
            }
        }
    }
}

async fn cancel(channel: Channel, job_id: &str) -> Result<()> {
    TrainerClient::new(channel)
        .cancel_job(proto::CancelJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(describe)?;
    Ok(())
}

/// Re-attaches to a job (`tlserve watch JOB`) and follows it to its end.
pub async fn watch(channel: Channel, job_id: String) -> Result<proto::HeadInfo> {
    let events = TrainerClient::new(channel.clone())
        .watch_job(proto::WatchJobRequest { job_id })
        .await
        .map_err(describe)?
        .into_inner();
    follow(channel, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: JobState) -> proto::TrainEvent {
        proto::TrainEvent {
            job_id: "j1".into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn progress_lines_show_embedding_and_epoch_metrics() {
        let mut embedding = event(JobState::Embedding);
        (embedding.embedded, embedding.total_inputs) = (3, 10);
        assert_eq!(progress_line(&embedding), "embedding 3/10 inputs");
        let mut epoch = event(JobState::Training);
        (epoch.epoch, epoch.total_epochs) = (0, 5);
        assert_eq!(progress_line(&epoch), "training (5 steps planned)");
        epoch.epoch = 2;
        epoch.metrics = Some(proto::HeadMetrics {
            train_loss: 0.5,
            train_accuracy: 0.75,
            validation_loss: Some(0.625),
            validation_accuracy: Some(0.5),
            ..Default::default()
        });
        assert_eq!(
            progress_line(&epoch),
            "epoch 2/5: loss 0.5000, accuracy 0.750, validation loss 0.6250, validation accuracy 0.500"
        );
        let mut step = epoch.clone();
        (step.step, step.total_steps, step.step_loss) = (30, 60, Some(0.25));
        assert_eq!(
            progress_line(&step),
            "step 30/60: batch loss 0.2500 (epoch 2 of 5 done)"
        );
        assert!(logged_step(&epoch) && !logged_step(&step));
        step.step = 50;
        assert!(logged_step(&step));
    }

    #[test]
    fn final_events_end_the_watch() {
        let mut status = StatusLine::stderr();
        let mut last = JobState::Unspecified;
        assert!(show(event(JobState::Queued), &mut status, &mut last).is_none());
        let mut failed = event(JobState::Failed);
        failed.error = "out of labels".into();
        let err = show(failed, &mut status, &mut last).unwrap().unwrap_err();
        assert_eq!(err.to_string(), "job j1 failed: out of labels");
        let mut done = event(JobState::Succeeded);
        done.head = Some(proto::HeadInfo {
            name: "h".into(),
            ..Default::default()
        });
        let head = show(done, &mut status, &mut last).unwrap().unwrap();
        assert_eq!(head.name, "h");
    }

    #[test]
    fn detaching_names_the_command_that_re_attaches() {
        let message = Detached {
            job_id: "abc".into(),
        }
        .to_string();
        assert!(message.ends_with("tlserve watch abc"), "{message}");
    }
}
