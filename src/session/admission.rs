//! `Admission`: how many generations run at once and how many may wait.
//! A request takes a `Ticket` before its 200 goes out (or gets 429); the
//! generation then waits for a run slot with its stream already open.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    running: Arc<Semaphore>,
    /// Tickets out: waiting plus running.
    admitted: Arc<AtomicUsize>,
    limit: usize,
    max_running: usize,
}

/// The queue is full.
#[derive(Debug)]
pub struct QueueFull;

impl Admission {
    pub fn new(max_running: usize, max_waiting: usize) -> Self {
        let max_running = max_running.max(1);
        Self {
            running: Arc::new(Semaphore::new(max_running)),
            admitted: Arc::new(AtomicUsize::new(0)),
            limit: max_running.saturating_add(max_waiting),
            max_running,
        }
    }

    /// A place in line, or `QueueFull` when every run slot is taken and
    /// the queue is at its limit.
    pub fn admit(&self) -> Result<Ticket, QueueFull> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .map_err(|_| QueueFull)?;
        Ok(Ticket {
            running: Arc::clone(&self.running),
            admitted: Arc::clone(&self.admitted),
            permit: None,
        })
    }

    /// Generations holding a run slot.
    pub fn running(&self) -> usize {
        self.max_running - self.running.available_permits()
    }

    /// Generations admitted but waiting for a run slot.
    pub fn waiting(&self) -> usize {
        self.admitted
            .load(Ordering::Acquire)
            .saturating_sub(self.running())
    }
}

/// One admitted generation. Dropping it gives back its place in line and
/// its run slot, if it had one.
pub struct Ticket {
    running: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Ticket {
    /// Waits for a run slot (first come, first served). Cancel-safe.
    pub async fn run(&mut self) {
        if self.permit.is_none() {
            // The semaphore is never closed, so acquiring cannot fail.
            self.permit = Arc::clone(&self.running).acquire_owned().await.ok();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_running_plus_waiting_then_refuses() {
        let admission = Admission::new(1, 1);
        let mut first = admission.admit().expect("runs");
        first.run().await;
        let mut second = admission.admit().expect("waits");
        assert!(admission.admit().is_err(), "queue full");
        assert_eq!((admission.running(), admission.waiting()), (1, 1));

        let waiting = tokio::spawn(async move {
            second.run().await;
            second
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits for the slot");
        drop(first);
        let second = waiting.await.expect("joined");
        assert_eq!((admission.running(), admission.waiting()), (1, 0));
        let third = admission.admit().expect("a place freed");
        drop((second, third));
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn a_ticket_dropped_while_waiting_frees_its_place() {
        let admission = Admission::new(1, 1);
        let mut running = admission.admit().expect("runs");
        running.run().await;
        let waiting = admission.admit().expect("waits");
        drop(waiting);
        assert!(admission.admit().is_ok());
    }
}
