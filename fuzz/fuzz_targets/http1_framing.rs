//! The HTTP/1 framing scanner (l7proxy::framing) over arbitrary request streams. Besides not
//! panicking, its verdicts must not depend on how the stream is cut into reads: a client
//! chooses its TCP segments, so a framing refused when sent at once must be refused when
//! dripped too (and the other way round).
#![no_main]

use l7proxy::framing::{Scanner, Verdicts};
use libfuzzer_sys::fuzz_target;

fn verdicts(chunks: impl Iterator<Item = Vec<u8>>) -> Vec<Option<&'static str>> {
    let verdicts = Verdicts::default();
    let mut scanner = Scanner::new(verdicts.clone());
    for chunk in chunks {
        scanner.feed(&chunk);
    }
    let v = verdicts.lock().unwrap().iter().copied().collect();
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let whole = verdicts(std::iter::once(stream.to_vec()));
    let step = usize::from(step % 16) + 1;
    let dripped = verdicts(stream.chunks(step).map(<[u8]>::to_vec));
    assert_eq!(whole, dripped, "verdicts differ when the stream arrives in {step}-byte reads");
});
