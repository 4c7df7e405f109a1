//! A connection's position vector: for every subscribed partition, the next offset the client
//! has not seen. It is every SSE event's `id:` (so `Last-Event-ID` resumes from it) and what a
//! WebSocket `subscribe` takes as `position`.
//!
//! Encoding, compact and computable by a client: `v1` then, for each partition,
//! `.<topic>-<partition>-<offset>`, the topic as the base-36 FNV-1a (32-bit) hash of its name and
//! both numbers in base 36: `v1.1u8ti5z-0-2n9c.f4k1qa-0-0`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::topics::TopicSpec;

/// (topic, partition) -> next offset.
pub type Positions = BTreeMap<(Arc<str>, i32), i64>;

/// The 32-bit FNV-1a hash of a topic name.
pub fn topic_hash(topic: &str) -> u32 {
    topic.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// Encodes a position vector.
pub fn encode(positions: &Positions) -> String {
    let mut out = String::from("v1");
    for ((topic, partition), offset) in positions {
        out.push('.');
        out.push_str(&base36(u64::from(topic_hash(topic))));
        out.push('-');
        out.push_str(&base36(*partition as u64));
        out.push('-');
        out.push_str(&base36(*offset as u64));
    }
    out
}

/// Decodes a position against the registry; unknown topic hashes are an error (the registry
/// changed, or the position was not ours).
pub fn decode(text: &str, registry: &[TopicSpec]) -> Result<Vec<(String, i32, i64)>, String> {
    let mut parts = text.trim().split('.');
    if parts.next() != Some("v1") {
        return Err("a position starts with v1".into());
    }
    let mut out = Vec::new();
    for part in parts {
        let mut fields = part.split('-');
        let (Some(h), Some(p), Some(o), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("{part:?} is not <topic>-<partition>-<offset>"));
        };
        let number =
            |s: &str| u64::from_str_radix(s, 36).map_err(|_| format!("{s:?} is not base 36"));
        let (h, p, o) = (number(h)?, number(p)?, number(o)?);
        let topic = registry
            .iter()
            .find(|t| u64::from(topic_hash(&t.name)) == h)
            .ok_or_else(|| format!("{part:?} names no topic of the registry"))?;
        let partition =
            i32::try_from(p).map_err(|_| format!("{part:?}: partition out of range"))?;
        let offset = i64::try_from(o).map_err(|_| format!("{part:?}: offset out of range"))?;
        out.push((topic.name.clone(), partition, offset));
    }
    if out.len() > 4096 {
        return Err("too many partitions in one position".into());
    }
    Ok(out)
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::stream::topics::default_registry;

    #[test]
    fn positions_round_trip_compactly() {
        let registry = default_registry();
        let mut p = Positions::new();
        p.insert((registry[0].name.as_str().into(), 0), 123_456);
        p.insert((registry[0].name.as_str().into(), 11), 0);
        p.insert((registry[2].name.as_str().into(), 3), 7);
        let text = encode(&p);
        assert!(text.starts_with("v1.") && text.len() < 60, "{text}");
        let back = decode(&text, &registry).unwrap();
        let again: Positions =
            back.into_iter().map(|(t, p, o)| ((t.as_str().into(), p), o)).collect();
        assert_eq!(again, p);
        assert_eq!(decode("v1", &registry).unwrap(), vec![]);
    }

    #[test]
    fn bad_positions_are_refused() {
        let registry = default_registry();
        assert!(decode("v2.a-0-0", &registry).is_err());
        assert!(decode("v1.zzzzz-0-0", &registry).unwrap_err().contains("no topic"));
        assert!(decode("v1.a-0", &registry).is_err());
        assert!(decode("v1.a-0-!", &registry).is_err());
        let h = base36(u64::from(topic_hash(&registry[0].name)));
        assert!(decode(&format!("v1.{h}-zzzzzzzzzzzz-0"), &registry).is_err());
    }

    #[test]
    fn registry_topics_have_distinct_hashes() {
        let registry = default_registry();
        let hashes: std::collections::HashSet<u32> =
            registry.iter().map(|t| topic_hash(&t.name)).collect();
        assert_eq!(hashes.len(), registry.len());
    }
}
