//! Gives the heap's free memory back to the system, now and then.
//!
//! glibc's allocator keeps memory that was freed: each thread's arena grows to its busiest
//! moment and shrinks only from its top, so the decoding of a first start (pages of
//! ReplicaSets, watch events, thousands of writes) leaves free holes that stay resident.
//! Measured in the middle of a first start with 1,000 Rollouts: 391 MB taken from the
//! system, 92 MB of it in use (`malloc_stats`); one `malloc_trim(0)` took the RSS from 390 to
//! 154 MiB (docs/performance.md). `malloc_trim` hands back every free page of every arena;
//! it walks only the free chunks, so on a quiet heap it costs next to nothing.

use std::time::Duration;

use tokio::sync::watch;

/// How often the free heap is handed back: short enough that a burst of work (a first start,
/// a hundred releases) leaves its memory for at most this long.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Hands the free heap back every `interval` until `stop`.
pub async fn give_back_free_memory(interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        // It takes the arenas' locks: off the runtime's worker threads.
        if tokio::task::spawn_blocking(trim).await.is_err() {
            return;
        }
    }
}

/// Returns whether any memory went back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks each arena).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators give memory back by themselves (or not at all): nothing to ask.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_when_asked() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(give_back_free_memory(Duration::from_millis(5), stop_rx));
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop_tx.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends once stopped")
            .expect("the task does not panic");
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_goes_back_to_the_system() {
        // Blocks under the mmap threshold, then every other one freed: 32 MiB of holes that
        // no trim from the top of the heap reaches, and that stay resident until trimmed.
        let mut blocks: Vec<Vec<u8>> = (0..1_000).map(|_| vec![1u8; 64 * 1024]).collect();
        let mut index = 0;
        blocks.retain(|_| {
            index += 1;
            index % 2 == 0
        });
        let before = resident_kib();
        assert!(trim(), "malloc_trim gave nothing back");
        let after = resident_kib();
        assert!(
            before.saturating_sub(after) >= 16 * 1024,
            "32 MiB were freed, yet the resident memory went only from {before} to {after} KiB"
        );
        drop(blocks);
    }

    fn resident_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}
