//! The shutdown sequence every role shares.
//!
//! Two phases, each a [`CancellationToken`] so any task can await it: *draining* (readiness turns
//! false, everything keeps serving so load balancers can move away) and *stopping* (listeners stop
//! accepting, open streams close deliberately, in-flight requests drain under a deadline).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cheap-clone handle on the process's shutdown state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    draining: CancellationToken,
    stopping: CancellationToken,
}

impl Shutdown {
    /// A fresh handle: neither draining nor stopping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Phase one: report not-ready, keep serving.
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Phase two: stop accepting, close streams, drain. Implies draining.
    pub fn stop(&self) {
        self.draining.cancel();
        self.stopping.cancel();
    }

    /// Whether phase one has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Whether phase two has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Resolves when phase two begins; long-lived tasks and open streams `select!` on this.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await
    }

    /// Runs the whole sequence on SIGTERM or SIGINT: drain, wait `grace`, stop. The handlers are
    /// installed when this is called (it must be called inside the runtime), not when the
    /// returned future first runs: a signal that arrives between the two (a Ctrl-C right after
    /// the listeners open, on a loaded machine) would otherwise end the process by its default
    /// action. The same handlers wait for the second signal, so one signal is never seen twice.
    pub fn on_signal(self, grace: Duration) -> impl std::future::Future<Output = ()> + Send {
        let mut signals = Signals::install();
        async move {
            signals.recv().await;
            tracing::info!(grace = ?grace, "shutdown signal received; reporting not ready");
            self.begin_drain();
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                // A second signal skips the grace period.
                _ = signals.recv() => tracing::warn!("second signal; skipping the grace period"),
            }
            tracing::info!("grace period over; stopping listeners and draining");
            self.stop();
        }
    }
}

/// SIGTERM and SIGINT handlers, installed once.
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(int)) => Signals { streams: Some((term, int)) },
                _ => {
                    tracing::error!(
                        "cannot install signal handlers; only ctrl-c will stop this process"
                    );
                    Signals { streams: None }
                }
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
