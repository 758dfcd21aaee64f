//! HMAC-SHA256 URL signatures with key ids, shared by the edge's upload URLs and private media
//! URLs. New signatures use the first key of a [`KeyList`]; every listed key verifies, so a key
//! is rotated by putting its successor first and removing it once its URLs have expired.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use conveyor_config::KeyList;
use conveyor_storage::clock::now_micros;

/// A signature over `message` with the first key, as `(kid, hex signature)`; `None` if there
/// are no keys.
pub fn sign(keys: &KeyList, message: &str) -> Option<(String, String)> {
    let (kid, key) = keys.first()?;
    Some((
        kid.to_owned(),
        hex::encode(mac(key, message).finalize().into_bytes()),
    ))
}

/// Whether `signature` (hex) is `message` signed by key `kid`, and `expires` (Unix seconds)
/// has not passed. Constant-time in the signature.
pub fn verify(keys: &KeyList, kid: &str, message: &str, signature: &str, expires: i64) -> bool {
    let Some(key) = keys.get(kid) else {
        return false;
    };
    let Ok(given) = hex::decode(signature) else {
        return false;
    };
    mac(key, message).verify_slice(&given).is_ok() && expires >= now_micros() / 1_000_000
}

fn mac(key: &str, message: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key length");
    mac.update(message.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_unaltered_unexpired_and_under_a_listed_key() {
        let keys = KeyList::parse("k2:new-secret,k1:old-secret").unwrap();
        let future = now_micros() / 1_000_000 + 60;
        let (kid, sig) = sign(&keys, "GET /media/x 123").unwrap();
        assert_eq!(kid, "k2");
        assert!(verify(&keys, "k2", "GET /media/x 123", &sig, future));
        assert!(
            !verify(&keys, "k2", "GET /media/y 123", &sig, future),
            "another message"
        );
        assert!(
            !verify(&keys, "k1", "GET /media/x 123", &sig, future),
            "another key"
        );
        assert!(
            !verify(&keys, "k9", "GET /media/x 123", &sig, future),
            "unknown key id"
        );
        assert!(
            !verify(&keys, "k2", "GET /media/x 123", "zz", future),
            "not hex"
        );
        assert!(
            !verify(&keys, "k2", "GET /media/x 123", &sig, future - 120),
            "expired"
        );
        // An older key still verifies what it signed, until it is removed.
        let old = KeyList::parse("k1:old-secret").unwrap();
        let (_, old_sig) = sign(&old, "m").unwrap();
        assert!(verify(&keys, "k1", "m", &old_sig, future));
        assert!(!verify(
            &KeyList::parse("k2:new-secret").unwrap(),
            "k1",
            "m",
            &old_sig,
            future
        ));
    }
}
