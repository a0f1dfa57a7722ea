//! l7mesh patch: a bound on the items one decode builds.
//!
//! Every array element and every unknown tagged field costs one item, charged when its count is
//! read, before any element is decoded. A frame of a few wire bytes per element (empty topic
//! entries, say) otherwise decodes into a hundred-plus bytes per element; under a budget the
//! decode stops at the count that would pass it. Without a budget in force (the default) nothing
//! is counted.
use anyhow::{bail, Result};
use std::cell::Cell;

thread_local! {
    static LEFT: Cell<Option<usize>> = const { Cell::new(None) };
    static OVER: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a decode) with at most `max` items; also says whether the budget ran out (the
/// decode then failed with an error saying so). Budgets do not nest: the inner one is in force
/// inside it, and the outer one's count resumes after.
pub fn with_item_budget<T>(max: usize, f: impl FnOnce() -> T) -> (T, bool) {
    struct Restore(Option<usize>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LEFT.with(|l| l.set(self.0));
            OVER.with(|o| o.set(self.1));
        }
    }
    let _restore = Restore(LEFT.with(|l| l.replace(Some(max))), OVER.with(|o| o.replace(false)));
    let out = f();
    (out, OVER.with(|o| o.get()))
}

/// Charges `n` items to the budget in force, if any.
pub(crate) fn spend(n: usize) -> Result<()> {
    LEFT.with(|l| match l.get() {
        None => Ok(()),
        Some(left) if n <= left => {
            l.set(Some(left - n));
            Ok(())
        }
        Some(left) => {
            OVER.with(|o| o.set(true));
            bail!("{n} more items than the {left} left of this message's item budget")
        }
    })
}
