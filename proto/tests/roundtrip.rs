//! Property tests: every message survives encode → decode unchanged, and
//! no byte string makes the decoder panic.

use proptest::prelude::*;
use touchline_proto::*;

fn record() -> impl Strategy<Value = Record> {
    (
        "[a-z0-9-]{1,16}",
        1u64..u64::MAX,
        any::<i64>(),
        "[ -~]{0,40}",
        "[a-z-]{1,20}",
        1u32..1000,
        1u32..10,
        proptest::option::of("[a-z-]{1,12}"),
        proptest::collection::vec(("[a-z]{1,6}", any::<i64>()), 0..4),
        any::<f64>().prop_filter("NaN never equals itself", |v| !v.is_nan()),
    )
        .prop_map(
            |(site, seq, at_ms, customer, achievement, version, tier, badge, points, value)| {
                Record {
                    site,
                    seq,
                    at_ms,
                    body: RecordBody::AchievementAwarded(AchievementAwarded {
                        customer,
                        achievement,
                        version,
                        tier,
                        badge,
                        points,
                        window: "lifetime".into(),
                        value,
                    }),
                }
            },
        )
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        ("[a-z0-9-]{0,64}", any::<u16>()).prop_map(|(site, protocol_version)| {
            ClientMessage::Hello {
                site,
                protocol_version,
            }
        }),
        (any::<u64>(), proptest::collection::vec(record(), 0..20)).prop_map(
            |(dropped_through, records)| ClientMessage::Batch {
                dropped_through,
                records
            }
        ),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        any::<u64>().prop_map(|last_durable| ServerMessage::Welcome { last_durable }),
        any::<u64>().prop_map(|through| ServerMessage::Ack { through }),
        (0usize..4, "[ -~]{0,80}").prop_map(|(r, message)| ServerMessage::Refused {
            reason: [
                RefusalReason::UnsupportedVersion,
                RefusalReason::SiteMismatch,
                RefusalReason::ProtocolViolation,
                RefusalReason::SinkUnavailable,
            ][r],
            message,
        }),
    ]
}

proptest! {
    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        let frame = encode_client(&msg).unwrap();
        prop_assert_eq!(decode_client(&frame).unwrap(), msg);
    }

    #[test]
    fn server_messages_round_trip(msg in server_message()) {
        let frame = encode_server(&msg).unwrap();
        prop_assert_eq!(decode_server(&frame).unwrap(), msg);
    }

    #[test]
    fn truncated_frames_are_errors(msg in client_message(), cut in 0usize..64) {
        let frame = encode_client(&msg).unwrap();
        let cut = cut.min(frame.len() - 1);
        prop_assert!(decode_client(&frame[..frame.len() - 1 - cut]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_client(&bytes);
        let _ = decode_server(&bytes);
    }

    #[test]
    fn records_have_the_documented_json_shape(rec in record()) {
        let json = rec.to_json();
        prop_assert_eq!(json["site"].as_str(), Some(rec.site.as_str()));
        prop_assert_eq!(json["seq"].as_u64(), Some(rec.seq));
        prop_assert_eq!(json["kind"].as_str(), Some("achievement_awarded"));
        prop_assert!(json["at"].is_string());
        prop_assert!(json["customer"].is_string());
        prop_assert!(json["tier"].is_u64());
    }
}

#[test]
fn oversized_length_prefix_is_refused_before_reading() {
    let mut frame = vec![0xff, 0xff, 0xff, 0xff];
    frame.extend_from_slice(&[0; 16]);
    assert!(matches!(
        decode_client(&frame),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn trailing_bytes_are_refused() {
    let mut frame = encode_server(&ServerMessage::Ack { through: 7 }).unwrap();
    frame.push(0);
    assert!(matches!(
        decode_server(&frame),
        Err(DecodeError::TrailingBytes { .. })
    ));
}

#[test]
fn the_version_byte_leads_the_payload() {
    let frame = encode_server(&ServerMessage::Welcome { last_durable: 3 }).unwrap();
    // Envelope::V1 is discriminant 0.
    assert_eq!(frame[FRAME_HEADER_LEN], 0);
}

#[test]
fn unknown_version_is_malformed() {
    let mut frame = encode_server(&ServerMessage::Welcome { last_durable: 3 }).unwrap();
    frame[FRAME_HEADER_LEN] = 9;
    assert!(matches!(
        decode_server(&frame),
        Err(DecodeError::Malformed(_))
    ));
}
