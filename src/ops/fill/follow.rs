//! `cdn-edge fill`: submits a manifest to a running edge and follows the job until it
//! ends, with a progress bar on a terminal and a line per change otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::admin_client::{AdminClient, AdminError};

/// Time between two looks at the job.
const POLL: Duration = Duration::from_millis(500);
/// How long the edge may stay unreachable while a job is followed (a restart, say)
/// before the command gives up; the job itself goes on.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);

/// Why `cdn-edge fill` failed.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("unexpected answer from the edge: {0}")]
    Unexpected(String),
    /// The job ended `failed` (the command exits with status 1).
    #[error("fill job {id} failed: {errors} slices or objects could not be fetched (the edge's log says why)")]
    Failed { id: String, errors: u64 },
}

/// `GET /fill/{id}`, as the edge answers it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Shown {
    state: String,
    slices_total: u64,
    slices_done: u64,
    bytes_done: u64,
    errors: u64,
}

impl Shown {
    fn finished(&self) -> bool {
        self.state == "done" || self.state == "failed"
    }

    fn line(&self, id: &str) -> String {
        format!(
            "fill {id}: {}: {}/{} slices, {} fetched, {} errors",
            self.state,
            self.slices_done,
            self.slices_total,
            HumanBytes(self.bytes_done),
            self.errors
        )
    }
}

/// Submits `manifest` (`{"objects": [...]}`); returns the job's id.
pub fn submit(client: &AdminClient, manifest: &serde_json::Value) -> Result<String, FollowError> {
    let answer = client.call("POST", "/fill", Some(manifest))?;
    answer
        .get("id")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| FollowError::Unexpected(answer.to_string()))
}

/// Follows job `id` until it is done (`Ok`) or failed, printing its progress on stdout.
#[allow(clippy::print_stdout)]
pub fn follow(client: &AdminClient, id: &str) -> Result<(), FollowError> {
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} slices")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let mut last: Option<Shown> = None;
    let mut reached = Instant::now();
    loop {
        let shown = match client.call("GET", &format!("/fill/{id}"), None) {
            Ok(v) => {
                reached = Instant::now();
                serde_json::from_value::<Shown>(v.clone())
                    .map_err(|e| FollowError::Unexpected(format!("{v}: {e}")))?
            }
            Err(AdminError::Unreachable { .. }) if reached.elapsed() < UNREACHABLE_FOR => {
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if last.as_ref() != Some(&shown) {
            match &bar {
                Some(bar) => {
                    bar.set_length(shown.slices_total);
                    bar.set_position(shown.slices_done);
                    bar.set_message(format!(
                        "fill {id}: {}, {} fetched, {} errors",
                        shown.state,
                        HumanBytes(shown.bytes_done),
                        shown.errors
                    ));
                }
                None => println!("{}", shown.line(id)),
            }
        }
        if shown.finished() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
                println!("{}", shown.line(id));
            }
            return match shown.state.as_str() {
                "done" => Ok(()),
                _ => Err(FollowError::Failed {
                    id: id.to_string(),
                    errors: shown.errors,
                }),
            };
        }
        last = Some(shown);
        std::thread::sleep(POLL);
    }
}
