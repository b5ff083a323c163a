//! The order in which one queue's finished requests enter the used ring:
//! the order the driver made them available, whatever order the disk
//! finished them in.
//!
//! That is what makes a backend restart exact without inflight tracking.
//! A frontend whose backend died hands the rings to the next backend
//! starting at the guest's used index. That is right only if every request
//! before that point in the available ring has completed and none after it
//! has. A request that finished early therefore waits here until every
//! request taken before it has finished too. Otherwise a restart would skip
//! an earlier request, and serve a finished one a second time, even after
//! the driver has reused its descriptors for a new request.
//!
//! The wait costs no disk time. A finished request has already left the
//! disk, and its blocks and buffers are released when it finishes, not
//! when it is published.

use std::collections::VecDeque;

#[derive(Debug, Default)]
pub struct UsedOrder {
    /// Heads taken from the available ring and not yet in the used ring,
    /// oldest first.
    taken: VecDeque<u16>,
    /// By head: how many times it is in `taken` (so a completion need not
    /// search `taken`, which a slow request at its front keeps long).
    /// (u32: a driver that makes a head available again and again while
    /// an earlier request waits must not make it saturate and stick.)
    taken_count: Vec<u32>,
    /// By head: how many of its requests have finished and wait for
    /// earlier ones (more than one only if a driver made a head available
    /// again before it completed), and the used length of the last.
    finished: Vec<(u32, u32)>,
}

impl UsedOrder {
    /// Records that the request at `head` was taken from the available ring.
    pub fn take(&mut self, head: u16) {
        self.taken.push_back(head);
        let index = usize::from(head);
        if self.taken_count.len() <= index {
            self.taken_count.resize(index + 1, 0);
        }
        self.taken_count[index] = self.taken_count[index].saturating_add(1);
    }

    fn untake(&mut self, head: u16) {
        if let Some(count) = self.taken_count.get_mut(usize::from(head)) {
            *count = count.saturating_sub(1);
        }
    }

    /// Records that the request at `head` finished with `used` bytes
    /// written, then hands `publish` every request that may enter the used
    /// ring now, in order. A head that was never taken goes out at once.
    pub fn finish(&mut self, head: u16, used: u32, mut publish: impl FnMut(u16, u32)) {
        let taken = self
            .taken_count
            .get(usize::from(head))
            .is_some_and(|&n| n > 0);
        if !taken {
            publish(head, used);
            return;
        }
        let index = usize::from(head);
        if self.finished.len() <= index {
            self.finished.resize(index + 1, (0, 0));
        }
        let slot = &mut self.finished[index];
        slot.0 = slot.0.saturating_add(1);
        slot.1 = used;
        self.publish_ready(&mut publish);
    }

    /// Hands `publish` the finished requests at the front, in order.
    fn publish_ready(&mut self, publish: &mut impl FnMut(u16, u32)) {
        while let Some(&front) = self.taken.front() {
            let Some(slot) = self
                .finished
                .get_mut(usize::from(front))
                .filter(|s| s.0 > 0)
            else {
                break;
            };
            slot.0 -= 1;
            let used = slot.1;
            self.taken.pop_front();
            self.untake(front);
            publish(front, used);
        }
    }

    /// Requests taken and not yet published.
    pub fn pending(&self) -> usize {
        self.taken.len()
    }

    /// Forgets a request that will never finish (the kernel may still be
    /// using its buffers), so the ones after it are not held back forever.
    pub fn forget(&mut self, head: u16, mut publish: impl FnMut(u16, u32)) {
        if let Some(at) = self.taken.iter().position(|&h| h == head) {
            self.taken.remove(at);
            self.untake(head);
        }
        self.publish_ready(&mut publish);
    }

    /// Forgets every request: the ring was stopped, and nothing taken from
    /// it is still running.
    pub fn clear(&mut self) {
        self.taken.clear();
        self.taken_count.clear();
        self.finished.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finish(order: &mut UsedOrder, head: u16, used: u32) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        order.finish(head, used, |h, u| out.push((h, u)));
        out
    }

    #[test]
    fn requests_enter_the_used_ring_in_the_order_they_were_taken() {
        let mut order = UsedOrder::default();
        for head in [5, 2, 9] {
            order.take(head);
        }
        assert_eq!(finish(&mut order, 2, 4097), []);
        assert_eq!(finish(&mut order, 9, 1), []);
        assert_eq!(order.pending(), 3);
        assert_eq!(finish(&mut order, 5, 1), [(5, 1), (2, 4097), (9, 1)]);
        assert_eq!(order.pending(), 0);
        order.take(2);
        assert_eq!(finish(&mut order, 2, 7), [(2, 7)]);
    }

    #[test]
    fn a_head_taken_twice_is_published_twice() {
        let mut order = UsedOrder::default();
        for head in [1, 3, 3] {
            order.take(head);
        }
        assert_eq!(finish(&mut order, 3, 1), []);
        assert_eq!(finish(&mut order, 3, 2), []);
        assert_eq!(finish(&mut order, 1, 1), [(1, 1), (3, 2), (3, 2)]);
        assert_eq!(order.pending(), 0);
    }

    #[test]
    fn a_forgotten_request_holds_nothing_back() {
        let mut order = UsedOrder::default();
        for head in [1, 2, 3] {
            order.take(head);
        }
        assert_eq!(finish(&mut order, 2, 9), []);
        let mut out = Vec::new();
        order.forget(1, |h, u| out.push((h, u)));
        assert_eq!(out, [(2, 9)]);
        assert_eq!(finish(&mut order, 3, 1), [(3, 1)]);
        assert_eq!(order.pending(), 0);
    }

    /// A head published or forgotten is no longer taken: its next
    /// completion without a new take goes out at once.
    #[test]
    fn a_head_leaves_the_taken_set_when_published_or_forgotten() {
        let mut order = UsedOrder::default();
        order.take(1);
        order.take(2);
        assert_eq!(finish(&mut order, 1, 1), [(1, 1)]);
        assert_eq!(finish(&mut order, 1, 5), [(1, 5)]);
        order.forget(2, |_, _| {});
        assert_eq!(finish(&mut order, 2, 3), [(2, 3)]);
        assert_eq!(order.pending(), 0);
    }

    #[test]
    fn a_head_never_taken_goes_out_at_once() {
        let mut order = UsedOrder::default();
        order.take(4);
        assert_eq!(finish(&mut order, 6, 1), [(6, 1)]);
        assert_eq!(order.pending(), 1);
        order.clear();
        assert_eq!(finish(&mut order, 4, 1), [(4, 1)]);
    }
}
