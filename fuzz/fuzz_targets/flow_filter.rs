//! The flow filter of l7proxy's admin API (`/v1/flows?verdict=..&since=..`): a query string
//! any local client sends. A bad filter is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else { return };
    let _ = l7proxy::flows::FlowFilter::parse(query);
    let _ = l7proxy::flows::parse_duration(query);
});
