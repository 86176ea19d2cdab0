//! Ed25519 signature checks of citizen assertions, batched across the requests in
//! flight. Handlers send their check to one verifier thread (as bookings go to the
//! committer) and await its answer; the thread takes every check waiting, up to
//! `BATCH_MAX`, and verifies them together with `ed25519_dalek::verify_batch` (about
//! half the cost per signature of one check at a time, measured in BENCHMARKS.md). A
//! batch that fails is checked again one signature at a time: a forged assertion costs
//! its batch at most 1.5× what single checks would have, never a wrong answer. (Halving
//! the batch until the bad ones are found costs more: about 3 batch checks per
//! signature for one bad one, 7 when all are.)
//!
//! One thread verifies some 108k assertions a second in batches with AVX-512 IFMA,
//! 40–57k with AVX2 (BENCHMARKS.md, `citizen_assertion_verify_in_flight`): far more than
//! the rest of a 2-core server handles; a larger machine may need more verifier threads.
//!
//! Must not import sled.

use std::sync::mpsc;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use tokio::sync::oneshot;

use crate::telemetry;

/// The most checks verified together (the gain levels off well before: with AVX2 12 µs
/// per signature at 256, 15–17 µs at 16–64; with IFMA 10–12 µs at 128, 13 µs at 16).
const BATCH_MAX: usize = 128;

/// One signature to check: `message` (the JWS signing input) signed by any of `keys`.
/// Batches use the first key; a check that fails in its batch tries each key alone
/// (an issuer's keys during a rotation: the caller puts the key that verified last
/// first).
pub struct Check {
    pub message: Vec<u8>,
    pub signature: Signature,
    pub keys: Vec<VerifyingKey>,
}

struct Pending {
    check: Check,
    reply: oneshot::Sender<Verified>,
}

/// Which of a check's keys signed it (its index in `Check::keys`), if any.
pub type Verified = Option<usize>;

/// The handle handlers send checks through; the thread ends when every clone is gone.
#[derive(Clone)]
pub struct SignatureBatches {
    sender: mpsc::Sender<Pending>,
}

impl SignatureBatches {
    /// Starts the verifier thread. The queue needs no bound of its own: each entry is a
    /// request in flight, bounded by `in_flight_requests_max`, or one whose client went
    /// away, dropped unchecked when the thread reaches it.
    pub fn start() -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("prenota-verify".into())
            .spawn(move || verify_until_closed(&receiver))?;
        Ok(Self { sender })
    }

    /// Which of `check.keys` signed `check.message`, if any.
    pub async fn verify(&self, check: Check) -> Verified {
        debug_assert!(!check.keys.is_empty(), "a signature check needs a key");
        let (reply, answer) = oneshot::channel();
        let sent = self.sender.send(Pending { check, reply });
        let verified = match sent {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        // The thread gone (it panicked): nothing is accepted, and the operator is told
        // once (a line per request could block the server on a slow log sink).
        verified.unwrap_or_else(|| {
            static TOLD: std::sync::Once = std::sync::Once::new();
            TOLD.call_once(|| {
                tracing::error!("the assertion verifier thread is gone: assertions are refused");
            });
            None
        })
    }
}

fn verify_until_closed(receiver: &mpsc::Receiver<Pending>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        // A requester that went away (its client cancelled) needs no check.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let checks: Vec<&Check> = batch.iter().map(|pending| &pending.check).collect();
        let verified = verify_all(&checks);
        metrics::histogram!(telemetry::ASSERTION_BATCH_SIGNATURES).record(batch.len() as f64);
        for (pending, verified) in batch.into_iter().zip(verified) {
            // A requester that went away no longer needs its answer.
            let _ = pending.reply.send(verified);
        }
    }
}

/// Which key signed each of `checks`, in order: together, else one at a time.
fn verify_all(checks: &[&Check]) -> Vec<Verified> {
    if checks.len() > 1 && verify_together(checks) {
        return vec![Some(0); checks.len()];
    }
    checks.iter().map(|check| verify_one(check)).collect()
}

fn verify_together(checks: &[&Check]) -> bool {
    let messages: Vec<&[u8]> = checks.iter().map(|c| c.message.as_slice()).collect();
    let signatures: Vec<Signature> = checks.iter().map(|c| c.signature).collect();
    let keys: Vec<VerifyingKey> = checks.iter().map(|c| c.keys[0]).collect();
    ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
}

fn verify_one(check: &Check) -> Verified {
    check
        .keys
        .iter()
        .position(|key| key.verify(&check.message, &check.signature).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn check(key: &SigningKey, message: &str, keys: &[&SigningKey]) -> Check {
        Check {
            message: message.as_bytes().to_vec(),
            signature: key.sign(message.as_bytes()),
            keys: keys.iter().map(|k| k.verifying_key()).collect(),
        }
    }

    #[test]
    fn a_failed_batch_finds_each_bad_signature_and_the_key_of_each_good_one() {
        let old = SigningKey::from_bytes(&[7; 32]);
        let new = SigningKey::from_bytes(&[9; 32]);
        let mut checks: Vec<Check> = (0..40)
            .map(|i| check(&old, &format!("citizen {i}"), &[&old, &new]))
            .collect();
        checks[3] = check(&new, "signed by the rotated key", &[&old, &new]);
        checks[17] = check(&new, "signed by a key not configured", &[&old]);
        checks[39].message.push(b'!'); // Tampered after signing.
        let verified = verify_all(&checks.iter().collect::<Vec<_>>());
        let bad: Vec<usize> = (0..40).filter(|&i| verified[i].is_none()).collect();
        assert_eq!(bad, [17, 39]);
        assert_eq!(
            verified[3],
            Some(1),
            "the rotated key, second of the check's keys"
        );
        assert_eq!(verified[0], Some(0));
        let good: Vec<&Check> = checks[..3].iter().collect();
        assert_eq!(verify_all(&good), [Some(0); 3]);
    }

    #[tokio::test]
    async fn checks_sent_together_are_answered_each() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let batches = SignatureBatches::start().unwrap();
        let answers = (0..200).map(|i| {
            let batches = batches.clone();
            let mut check = check(&key, &format!("citizen {i}"), &[&key]);
            if i % 50 == 7 {
                check.message.push(b'!');
            }
            tokio::spawn(async move { batches.verify(check).await })
        });
        let mut valid = Vec::new();
        for answer in answers.collect::<Vec<_>>() {
            valid.push(answer.await.unwrap().is_some());
        }
        let bad: Vec<usize> = (0..200).filter(|&i| !valid[i]).collect();
        assert_eq!(bad, [7, 57, 107, 157]);
    }
}
