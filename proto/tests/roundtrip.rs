//! Property tests: every message survives encode → decode unchanged, and
//! no byte string makes the decoder panic.

use proptest::prelude::*;
use touchline_proto::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z-]{1,20}"
}

fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("NaN never equals itself", |v| !v.is_nan())
}

fn counts() -> impl Strategy<Value = Vec<(String, i64)>> {
    proptest::collection::vec(("[a-z]{1,6}", any::<i64>()), 0..4)
}

fn award() -> impl Strategy<Value = RecordBody> {
    (
        "[ -~]{0,40}",
        name(),
        1u32..1000,
        1u32..10,
        proptest::option::of("[a-z-]{1,12}"),
        counts(),
        "[a-z0-9:-]{1,24}",
        finite(),
    )
        .prop_map(
            |(customer, achievement, version, tier, badge, points, window, value)| {
                RecordBody::AchievementAwarded(AchievementAwarded {
                    customer,
                    achievement,
                    version,
                    tier,
                    badge,
                    points,
                    window,
                    value,
                })
            },
        )
}

fn summary() -> impl Strategy<Value = RecordBody> {
    (
        "[ -~]{0,40}",
        name(),
        counts(),
        proptest::collection::vec(name(), 0..4),
        proptest::collection::vec((name(), any::<u32>(), finite(), finite()), 0..4),
    )
        .prop_map(|(customer, period, points, badges, progress)| {
            RecordBody::PeriodSummary(PeriodSummary {
                customer,
                period,
                points,
                badges,
                progress: progress
                    .into_iter()
                    .map(|(rule, version, value, next_at)| RuleProgress {
                        rule,
                        version,
                        value,
                        next_at,
                    })
                    .collect(),
            })
        })
}

fn rule_stats() -> impl Strategy<Value = RecordBody> {
    (
        name(),
        any::<u32>(),
        any::<i64>(),
        any::<i64>(),
        any::<[u64; 4]>(),
    )
        .prop_map(
            |(rule, version, from_ms, to_ms, [matched, awards, late, limited])| {
                RecordBody::RuleStats(RuleStats {
                    rule,
                    version,
                    from_ms,
                    to_ms,
                    matched,
                    awards,
                    late,
                    limited,
                })
            },
        )
}

fn offer_records() -> impl Strategy<Value = RecordBody> {
    prop_oneof![
        (
            "[ -~]{0,40}",
            name(),
            any::<u32>(),
            "[a-z0-9]{1,26}",
            name(),
            finite(),
            any::<bool>(),
            name(),
            any::<i64>()
        )
            .prop_map(
                |(
                    customer,
                    offer,
                    version,
                    instance,
                    trigger,
                    score,
                    control,
                    segment,
                    expires_ms,
                )| {
                    RecordBody::OfferDecision(OfferDecision {
                        customer,
                        offer,
                        version,
                        instance,
                        trigger,
                        score,
                        control,
                        segment,
                        expires_ms,
                    })
                }
            ),
        (
            "[ -~]{0,40}",
            name(),
            any::<u32>(),
            "[a-z0-9]{1,26}",
            name()
        )
            .prop_map(|(customer, offer, version, instance, outcome)| {
                RecordBody::OfferOutcome(OfferOutcome {
                    customer,
                    offer,
                    version,
                    instance,
                    outcome,
                })
            }),
        (
            name(),
            any::<u32>(),
            any::<(i64, i64)>(),
            any::<[u64; 8]>(),
            proptest::collection::vec((name(), any::<u64>()), 0..4)
        )
            .prop_map(|(offer, version, (from_ms, to_ms), n, suppressed)| {
                RecordBody::OfferStats(OfferStats {
                    offer,
                    version,
                    from_ms,
                    to_ms,
                    decided: n[0],
                    shown: n[1],
                    accepted: n[2],
                    dismissed: n[3],
                    expired: n[4],
                    suppressed,
                    control: n[5],
                    converted_treated: n[6],
                    converted_control: n[7],
                })
            }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    let body = prop_oneof![
        award(),
        summary(),
        rule_stats(),
        "[ -~]{0,40}".prop_map(|customer| RecordBody::CustomerErased(CustomerErased { customer })),
        offer_records(),
    ];
    ("[a-z0-9-]{1,16}", 1u64..u64::MAX, any::<i64>(), body).prop_map(|(site, seq, at_ms, body)| {
        Record {
            site,
            seq,
            at_ms,
            body,
        }
    })
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
        prop_assert_eq!(json["kind"].as_str(), Some(rec.body.kind()));
        prop_assert!(json["at"].is_string());
        // Customer records name the customer; aggregate ones do not.
        prop_assert_eq!(json["customer"].as_str(), rec.body.customer());
        match &rec.body {
            RecordBody::AchievementAwarded(a) => {
                prop_assert_eq!(json["tier"].as_u64(), Some(u64::from(a.tier)));
                prop_assert_eq!(json["points"].as_object().map(|p| p.len()),
                    Some(a.points.iter().map(|(k, _)| k).collect::<std::collections::BTreeSet<_>>().len()));
            }
            RecordBody::RuleStats(r) => prop_assert_eq!(json["late"].as_u64(), Some(r.late)),
            RecordBody::OfferDecision(d) => prop_assert_eq!(json["control"].as_bool(), Some(d.control)),
            RecordBody::OfferStats(s) => prop_assert!(json["suppressed"].is_object() && json["converted_control"].as_u64() == Some(s.converted_control)),
            RecordBody::PeriodSummary(p) => prop_assert_eq!(json["progress"].as_array().map(Vec::len), Some(p.progress.len())),
            _ => {}
        }
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
