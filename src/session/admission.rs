//! `Admission`: how many generations run at once and how many may wait,
//! in all and per caller. A request takes a `Ticket` before its 200 goes
//! out (or gets 429); the generation then waits for a run slot with its
//! stream already open, and calls its backend only once it holds one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::CallerId;

/// Limits of one caller (one API key). `None`: only the global limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct PerCaller {
    /// Generations of one caller running at once.
    pub running: Option<usize>,
    /// Generations of one caller admitted (running plus waiting).
    pub admitted: Option<usize>,
}

pub struct Admission {
    running: Arc<Semaphore>,
    /// Tickets out: waiting plus running.
    admitted: Arc<AtomicUsize>,
    limit: usize,
    max_running: usize,
    per_caller: PerCaller,
    callers: Arc<Mutex<HashMap<CallerId, Quota>>>,
}

/// What one caller holds; gone once it holds nothing.
struct Quota {
    admitted: usize,
    running: Arc<Semaphore>,
}

/// The queue is full, in all or for this caller.
#[derive(Debug)]
pub struct QueueFull;

impl Admission {
    pub fn new(max_running: usize, max_waiting: usize, per_caller: PerCaller) -> Self {
        let max_running = max_running.max(1);
        Self {
            running: Arc::new(Semaphore::new(max_running)),
            admitted: Arc::new(AtomicUsize::new(0)),
            limit: max_running.saturating_add(max_waiting),
            max_running,
            per_caller,
            callers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CallerId, Quota>> {
        self.callers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place in line, or `QueueFull` when every run slot is taken and
    /// the queue is at its limit, or when this caller holds its share.
    pub fn admit(&self, caller: CallerId) -> Result<Ticket, QueueFull> {
        let mine = {
            let mut callers = self.lock();
            let quota = callers.entry(caller).or_insert_with(|| Quota {
                admitted: 0,
                running: Arc::new(Semaphore::new(
                    self.per_caller.running.unwrap_or(Semaphore::MAX_PERMITS),
                )),
            });
            if self
                .per_caller
                .admitted
                .is_some_and(|cap| quota.admitted >= cap)
            {
                if quota.admitted == 0 {
                    callers.remove(&caller);
                }
                return Err(QueueFull);
            }
            let taken = self
                .admitted
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.limit).then_some(n + 1)
                });
            if taken.is_err() {
                if quota.admitted == 0 {
                    callers.remove(&caller);
                }
                return Err(QueueFull);
            }
            quota.admitted += 1;
            Arc::clone(&quota.running)
        };
        Ok(Ticket {
            caller,
            mine,
            running: Arc::clone(&self.running),
            admitted: Arc::clone(&self.admitted),
            callers: Arc::clone(&self.callers),
            permits: None,
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
    caller: CallerId,
    /// The caller's own run slots.
    mine: Arc<Semaphore>,
    running: Arc<Semaphore>,
    admitted: Arc<AtomicUsize>,
    callers: Arc<Mutex<HashMap<CallerId, Quota>>>,
    /// The caller's slot, then the global one.
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Ticket {
    /// Waits for a run slot: first the caller's own, then one of all
    /// (first come, first served). Cancel-safe.
    pub async fn run(&mut self) {
        if self.permits.is_some() {
            return;
        }
        // Neither semaphore is ever closed, so acquiring cannot fail.
        let Ok(mine) = Arc::clone(&self.mine).acquire_owned().await else {
            return;
        };
        let Ok(global) = Arc::clone(&self.running).acquire_owned().await else {
            return;
        };
        self.permits = Some((mine, global));
    }

    /// Takes a run slot if one is free now.
    pub fn try_run(&mut self) -> bool {
        if self.permits.is_some() {
            return true;
        }
        let Ok(mine) = Arc::clone(&self.mine).try_acquire_owned() else {
            return false;
        };
        let Ok(global) = Arc::clone(&self.running).try_acquire_owned() else {
            return false;
        };
        self.permits = Some((mine, global));
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.permits = None;
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(quota) = callers.get_mut(&self.caller) {
            quota.admitted -= 1;
            if quota.admitted == 0 {
                callers.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: CallerId = CallerId(1);
    const B: CallerId = CallerId(2);

    #[tokio::test]
    async fn admits_up_to_running_plus_waiting_then_refuses() {
        let admission = Admission::new(1, 1, PerCaller::default());
        let mut first = admission.admit(A).expect("runs");
        first.run().await;
        let mut second = admission.admit(A).expect("waits");
        assert!(admission.admit(A).is_err(), "queue full");
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
        let third = admission.admit(A).expect("a place freed");
        drop((second, third));
        assert_eq!((admission.running(), admission.waiting()), (0, 0));
        assert!(admission.lock().is_empty(), "no caller state left");
    }

    #[tokio::test]
    async fn a_ticket_dropped_while_waiting_frees_its_place() {
        let admission = Admission::new(1, 1, PerCaller::default());
        let mut running = admission.admit(A).expect("runs");
        running.run().await;
        let waiting = admission.admit(A).expect("waits");
        drop(waiting);
        assert!(admission.admit(A).is_ok());
    }

    #[tokio::test]
    async fn one_caller_cannot_take_every_place() {
        let per_caller = PerCaller {
            running: Some(1),
            admitted: Some(3),
        };
        let admission = Admission::new(2, 8, per_caller);
        let mut a: Vec<_> = (0..3).map(|_| admission.admit(A).expect("a")).collect();
        assert!(admission.admit(A).is_err(), "A holds its share");
        assert!(a[0].try_run());
        assert!(!a[1].try_run(), "one running per caller");
        let mut b = admission.admit(B).expect("B still gets in");
        assert!(b.try_run(), "and a run slot, though A waits");
        drop(a.remove(0));
        assert!(a[0].try_run(), "A's next runs once its first ends");
    }
}
