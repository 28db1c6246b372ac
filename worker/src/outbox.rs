//! Instance status reports waiting for the broker: at most one per instance (the latest status
//! wins), at most `capacity` instances, sent in the order of their latest change. Periodic
//! reports never go here; they are simply skipped while disconnected.

use std::collections::VecDeque;

use crate::protocol::JobStatus;

#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<JobStatus>,
    capacity: usize,
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            queue: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
        }
    }

    /// Queues `s`, replacing an older report for the same instance. When full, the oldest
    /// report is evicted and returned so the caller can count and log it.
    pub fn push(&mut self, s: JobStatus) -> Option<JobStatus> {
        if let Some(i) = self
            .queue
            .iter()
            .position(|q| q.sname == s.sname && q.instance == s.instance)
        {
            self.queue.remove(i);
        }
        self.queue.push_back(s);
        if self.queue.len() > self.capacity {
            return self.queue.pop_front();
        }
        None
    }

    pub fn front(&self) -> Option<&JobStatus> {
        self.queue.front()
    }

    pub fn pop_front(&mut self) -> Option<JobStatus> {
        self.queue.pop_front()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Status;

    fn st(job: &str, n: u64, status: Status) -> JobStatus {
        JobStatus {
            sname: job.into(),
            status,
            status_detail: String::new(),
            instance: n,
            publicip: String::new(),
        }
    }

    #[test]
    fn latest_status_per_instance_in_order_of_change() {
        let mut o = Outbox::new(8);
        o.push(st("a.b.c.d", 0, Status::Failed));
        o.push(st("a.b.c.d", 1, Status::Created));
        o.push(st("x.y.z.w", 0, Status::Dead));
        o.push(st("a.b.c.d", 0, Status::Undeployed)); // replaces and moves to the back
        let order: Vec<(String, u64, Status)> = std::iter::from_fn(|| o.pop_front())
            .map(|s| (s.sname, s.instance, s.status))
            .collect();
        assert_eq!(
            order,
            vec![
                ("a.b.c.d".into(), 1, Status::Created),
                ("x.y.z.w".into(), 0, Status::Dead),
                ("a.b.c.d".into(), 0, Status::Undeployed),
            ]
        );
    }

    #[test]
    fn bounded_with_oldest_evicted() {
        let mut o = Outbox::new(3);
        for n in 0..3 {
            assert_eq!(o.push(st("a.b.c.d", n, Status::Dead)), None);
        }
        let evicted = o.push(st("a.b.c.d", 3, Status::Dead)).unwrap();
        assert_eq!(evicted.instance, 0);
        assert_eq!(o.len(), 3);
        // Updating a queued instance never evicts.
        assert_eq!(o.push(st("a.b.c.d", 2, Status::Failed)), None);
        assert_eq!(o.front().map(|s| s.instance), Some(1));
        for _ in 0..1000 {
            o.push(st("a.b.c.d", 7, Status::Dead));
        }
        assert_eq!(o.len(), 3);
    }
}
