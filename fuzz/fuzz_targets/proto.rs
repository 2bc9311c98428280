//! Every auth.v1 message authd or its client library decodes, from any bytes: decoded
//! or refused, and what decodes survives a round trip. The first byte picks the message.
#![no_main]

use authd::proto::auth::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq>(bytes: &[u8]) {
    let Ok(message) = M::decode(bytes) else {
        return;
    };
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len());
    let again = match M::decode(encoded.as_slice()) {
        Ok(again) => again,
        Err(e) => panic!("re-encoded message does not decode: {e}"),
    };
    assert!(again == message, "round trip changed the message");
}

fuzz_target!(|data: &[u8]| {
    let [which, bytes @ ..] = data else { return };
    match which % 11 {
        // Requests: what authd decodes.
        0 => round_trip::<pb::RegisterRequest>(bytes),
        1 => round_trip::<pb::LoginRequest>(bytes),
        2 => round_trip::<pb::LogoutRequest>(bytes),
        3 => round_trip::<pb::ChangePasswordRequest>(bytes),
        4 => round_trip::<pb::ListSessionsRequest>(bytes),
        5 => round_trip::<pb::RevokeSessionRequest>(bytes),
        6 => round_trip::<pb::ValidateTokenRequest>(bytes),
        7 => round_trip::<pb::WatchRevocationsRequest>(bytes),
        // Responses: what the client library decodes.
        8 => round_trip::<pb::ValidateTokenResponse>(bytes),
        9 => round_trip::<pb::RevocationEvent>(bytes),
        _ => round_trip::<pb::LoginResponse>(bytes),
    }
});
