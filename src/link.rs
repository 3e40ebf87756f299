//! Whether a connection to an outside system is up, and if not, why: what `/ready` reports.

use std::sync::Mutex;

/// A connection's state, shared between the thread that keeps it and those that report it.
#[derive(Debug)]
pub struct Link(Mutex<Result<(), String>>);

impl Default for Link {
    fn default() -> Self {
        Link(Mutex::new(Err("not connected yet".into())))
    }
}

impl Link {
    pub fn up(&self) {
        *self.lock() = Ok(());
    }

    pub fn down(&self, why: impl Into<String>) {
        *self.lock() = Err(why.into());
    }

    /// `Ok` while up; the reason otherwise.
    pub fn status(&self) -> Result<(), String> {
        self.lock().clone()
    }

    pub fn is_up(&self) -> bool {
        self.lock().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<(), String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
