//! The ClientHello reader that finds a connection's SNI before any TLS is terminated
//! (l7proxy::sni): arbitrary first bytes of a connection, whole or in part.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = l7proxy::sni::parse(data);
    // A prefix never finds a different name than the whole hello (more bytes can only complete it).
    if let Ok(Some(name)) = &whole {
        for cut in [data.len() / 2, data.len().saturating_sub(1)] {
            if let Ok(Some(other)) = l7proxy::sni::parse(&data[..cut]) {
                assert_eq!(&other, name, "a prefix of the hello names another server");
            }
        }
    }
});
