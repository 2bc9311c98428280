//! The configuration's parsing, through `Config::from_vars` as start-up calls it.

use super::*;
use serde::Deserialize;
use std::path::Path;

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const SECRET: (&str, &str) = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");

#[test]
fn defaults_apply_when_only_the_secret_is_set() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert_eq!(c.jwt.ttl, Duration::from_secs(86_400));
    assert_eq!(c.jwt.leeway, Duration::from_secs(30));
    assert_eq!(c.session_idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.bcrypt.cost, 12);
    assert_eq!(c.bcrypt.priority, HashPriority::Idle);
    assert_eq!(c.grpc_addr.port(), 50051);
    assert!(c.grpc_reflection);
    assert!(!c.jwt.generated_secret);
}

#[test]
fn nothing_configured_means_embedded_storage_and_a_generated_key() {
    let c = Config::from_vars(vars(&[])).unwrap();
    assert!(matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("authd.db")));
    assert!(matches!(c.sessions, SessionsBackend::Memory));
    assert!(c.jwt.generated_secret);
    assert_eq!(c.jwt.secret.expose().len(), 32);
    let again = Config::from_vars(vars(&[])).unwrap();
    assert_ne!(c.jwt.secret.expose(), again.jwt.secret.expose());
}

#[test]
fn sqlite_path_and_url_choose_the_file() {
    let c = Config::from_vars(vars(&[("SQLITE_PATH", "data/users.db")])).unwrap();
    assert!(
        matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("data/users.db"))
    );
    let c = Config::from_vars(vars(&[(
        "DATABASE_URL",
        "sqlite:///var/lib/authd/u.db?mode=rwc",
    )]))
    .unwrap();
    assert!(
        matches!(&c.users, UsersBackend::Sqlite { path } if path == Path::new("/var/lib/authd/u.db"))
    );
    let e = Config::from_vars(vars(&[("DATABASE_URL", "sqlite://")])).unwrap_err();
    assert_eq!(e.variable, "DATABASE_URL");
}

#[test]
fn mysql_or_redis_configured_require_the_secret() {
    for set in [
        ("DB_HOST", "db"),
        ("DATABASE_URL", "mysql://db/authd"),
        ("REDIS_ADDR", "r:6379"),
    ] {
        let e = Config::from_vars(vars(&[set])).unwrap_err();
        assert_eq!(e.variable, "JWT_SECRET", "{set:?}");
    }
}

#[test]
fn mixed_backends_are_allowed() {
    let c = Config::from_vars(vars(&[SECRET, ("DB_HOST", "db")])).unwrap();
    assert!(matches!(c.users, UsersBackend::MySql(_)));
    assert!(matches!(c.sessions, SessionsBackend::Memory));
    let c = Config::from_vars(vars(&[SECRET, ("REDIS_ADDR", "r:6379")])).unwrap();
    assert!(matches!(c.users, UsersBackend::Sqlite { .. }));
    assert!(matches!(c.sessions, SessionsBackend::Redis(_)));
}

#[test]
fn a_short_secret_names_the_variable() {
    let e = Config::from_vars(vars(&[("JWT_SECRET", "short")])).unwrap_err();
    assert_eq!(e.variable, "JWT_SECRET");
    assert!(e.problem.contains("at least 32 bytes"), "{e}");
}

#[test]
fn an_unparsable_duration_names_the_variable() {
    let e = Config::from_vars(vars(&[SECRET, ("JWT_TTL", "a day")])).unwrap_err();
    assert_eq!(e.variable, "JWT_TTL");
    let e = Config::from_vars(vars(&[SECRET, ("SESSION_IDLE_TIMEOUT", "5")])).unwrap_err();
    assert_eq!(e.variable, "SESSION_IDLE_TIMEOUT");
}

#[test]
fn durations_use_humantime() {
    let c = Config::from_vars(vars(&[SECRET, ("JWT_TTL", "90m"), ("JWT_LEEWAY", "5s")])).unwrap();
    assert_eq!(c.jwt.ttl, Duration::from_secs(5400));
    assert_eq!(c.jwt.leeway, Duration::from_secs(5));
}

#[test]
fn old_redis_names_keep_working_and_passwords_are_encoded() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("REDIS_ADDR", "cache:6380"),
        ("REDIS_PASSWORD", "p@ss/word"),
    ]))
    .unwrap();
    let SessionsBackend::Redis(redis) = c.sessions else {
        panic!("not redis")
    };
    assert_eq!(single_url(&redis), "redis://:p%40ss%2Fword@cache:6380/");
    assert_eq!(redis.failure_mode, RedisFailureMode::Open);
}

#[test]
fn old_db_names_keep_working() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("DB_HOST", "db.internal"),
        ("DB_PORT", "3307"),
        ("DB_USER", "authd"),
        ("DB_PASS", "pw"),
        ("DB_NAME", "users"),
    ]))
    .unwrap();
    let UsersBackend::MySql(db) = c.users else {
        panic!("not mysql")
    };
    assert_eq!(db.display, "db.internal:3307");
    let o = db.options.expose();
    assert_eq!(o.get_host(), "db.internal");
    assert_eq!(o.get_port(), 3307);
    assert_eq!(o.get_username(), "authd");
    assert_eq!(o.get_database(), Some("users"));
    assert_eq!(db.query_timeout, Duration::from_secs(2));
    for bad in ["0s", "soon"] {
        let e = Config::from_vars(vars(&[
            SECRET,
            ("DB_HOST", "db"),
            ("DB_QUERY_TIMEOUT", bad),
        ]))
        .unwrap_err();
        assert_eq!(e.variable, "DB_QUERY_TIMEOUT");
    }
}

#[test]
fn whole_urls_win_over_parts() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("DATABASE_URL", "mysql://u:p@dbhost:3310/x"),
        ("DB_HOST", "ignored"),
        ("REDIS_URL", "redis://r:6390/2"),
        ("REDIS_ADDR", "ignored:1"),
    ]))
    .unwrap();
    assert_eq!(c.users.describe(), "MySQL at dbhost:3310");
    let SessionsBackend::Redis(redis) = c.sessions else {
        panic!("not redis")
    };
    assert_eq!(single_url(&redis), "redis://r:6390/2");
}

#[test]
fn bcrypt_nice_is_idle_or_a_niceness() {
    for (value, expected) in [
        ("idle", HashPriority::Idle),
        (" IDLE ", HashPriority::Idle),
        ("0", HashPriority::Nice(0)),
        ("19", HashPriority::Nice(19)),
    ] {
        let c = Config::from_vars(vars(&[SECRET, ("BCRYPT_NICE", value)])).unwrap();
        assert_eq!(c.bcrypt.priority, expected, "{value}");
    }
}

#[test]
fn bad_values_name_their_variable() {
    for (name, value) in [
        ("BCRYPT_COST", "3"),
        ("BCRYPT_COST", "twelve"),
        ("BCRYPT_NICE", "20"),
        ("BCRYPT_NICE", "-5"),
        ("BCRYPT_NICE", "lowest"),
        ("REDIS_FAILURE_MODE", "sometimes"),
        ("REDIS_PASSWORD", "no-addr"),
        ("GRPC_ADDR", "nowhere"),
        ("GRPC_REFLECTION", "maybe"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "postgres://x"),
        ("REDIS_URL", "http://x"),
        ("REDIS_KEY_PREFIX", "a{b}"),
        ("MAX_SESSIONS_PER_USER", "-1"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("TRUSTED_PROXIES", "gateway.internal"),
        ("THROTTLE_ACCOUNT_THRESHOLD", "0"),
        ("THROTTLE_ADDRESS_WINDOW", "soon"),
        ("THROTTLE_ADDRESS_MAX_DELAY", "1ms"),
        ("THROTTLE_BASE_DELAY", "0s"),
        ("THROTTLE_REGISTER_THRESHOLD", "0"),
        ("THROTTLE_REGISTER_WINDOW", "hourly"),
        ("THROTTLE_SECOND_FACTOR_THRESHOLD", "0"),
        ("THROTTLE_SECOND_FACTOR_WINDOW", "weekly"),
        ("BCRYPT_MAX_PER_ADDRESS", "0"),
        ("PASSWORD_POLICY", "strict"),
        ("PASSWORD_MIN_LENGTH", "7"),
        ("PASSWORD_MIN_STRENGTH", "5"),
        ("AUDIT_RETENTION", "10s"),
        ("AUDIT_PURGE_INTERVAL", "1ms"),
        ("AUDIT_QUEUE", "0"),
        ("HTTP_ADDR", "port 8080"),
        ("TLS_RELOAD_INTERVAL", "often"),
        ("GRPC_MAX_MESSAGE_SIZE", "64 kilobytes"),
        ("GRPC_MAX_MESSAGE_SIZE", "0"),
        ("GRPC_MAX_HEADER_LIST_SIZE", "8GiB-ish"),
        ("GRPC_CONCURRENCY_LIMIT", "0"),
        ("GRPC_CONNECTION_CONCURRENCY_LIMIT", "many"),
        ("GRPC_REQUEST_TIMEOUT", "0s"),
        ("GRPC_KEEPALIVE_INTERVAL", "30"),
        ("GRPC_KEEPALIVE_TIMEOUT", "soon"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
    ] {
        let e = Config::from_vars(vars(&[SECRET, (name, value)])).unwrap_err();
        assert_eq!(e.variable, name, "{name}={value}: {e}");
    }
}

fn key(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn asymmetric_keys_are_read_and_checked_at_start_up() {
    let c = Config::from_vars(vars(&[
        ("JWT_ALGORITHM", "es256"),
        ("JWT_PRIVATE_KEY_FILE", &key("p256.pem")),
    ]))
    .unwrap();
    assert_eq!(c.jwt.algorithm, SigningAlgorithm::Es256);
    assert!(
        !c.jwt.generated_secret,
        "no secret is made for an asymmetric key"
    );

    let e = Config::from_vars(vars(&[("JWT_ALGORITHM", "ES256")])).unwrap_err();
    assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
    let e = Config::from_vars(vars(&[
        ("JWT_ALGORITHM", "ES256"),
        ("JWT_PRIVATE_KEY_FILE", &key("rsa.pem")),
    ]))
    .unwrap_err();
    assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
    let e = Config::from_vars(vars(&[
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", "/nonexistent/key.pem"),
    ]))
    .unwrap_err();
    assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE");
    let e = Config::from_vars(vars(&[("JWT_ALGORITHM", "HS512")])).unwrap_err();
    assert_eq!(e.variable, "JWT_ALGORITHM");
}

#[test]
fn the_name_hash_key_is_never_empty() {
    assert!(NameHashKey::new(Vec::new(), NameHashKeySource::Configured).is_none());
    assert!(NameHashKey::new(vec![7; 31], NameHashKeySource::JwtSecret).is_none());
    assert_eq!(NameHashKey::generate().expose().len(), 32);
    let asymmetric = [
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", key("ed25519.pem").leak() as &str),
    ];
    let with =
        |extra: &[(&str, &str)]| Config::from_vars(vars(&[asymmetric.as_slice(), extra].concat()));
    // Embedded: a random key of this process's own, never an empty one.
    let c = with(&[]).unwrap();
    assert_eq!(c.name_hash_key.source(), NameHashKeySource::Generated);
    assert_eq!(c.name_hash_key.expose().len(), 32);
    assert_ne!(
        c.name_hash_key.expose(),
        with(&[]).unwrap().name_hash_key.expose()
    );
    // Shared state: refused, naming the variable…
    for shared in [("DB_HOST", "db"), ("REDIS_ADDR", "r:6379")] {
        let e = with(&[shared]).unwrap_err();
        assert_eq!(e.variable, "NAME_HASH_KEY", "{shared:?}");
        // …also when a JWT_SECRET too short to key anything is set.
        let e = with(&[shared, ("JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(e.variable, "NAME_HASH_KEY", "{shared:?}");
        let c = with(&[shared, ("NAME_HASH_KEY", SECRET.1)]).unwrap();
        assert_eq!(c.name_hash_key.source(), NameHashKeySource::Configured);
    }
    let e = with(&[("NAME_HASH_KEY", "short")]).unwrap_err();
    assert_eq!(e.variable, "NAME_HASH_KEY");
    assert!(!e.problem.contains("short"), "the key was printed: {e}");
    // JWT_SECRET keys it when NAME_HASH_KEY is absent, as before it existed.
    let c = Config::from_vars(vars(&[SECRET, ("DB_HOST", "db")])).unwrap();
    assert_eq!(c.name_hash_key.source(), NameHashKeySource::JwtSecret);
    assert_eq!(c.name_hash_key.expose(), SECRET.1.as_bytes());
    let c = Config::from_vars(vars(&[
        SECRET,
        ("DB_HOST", "db"),
        ("NAME_HASH_KEY", "another-key-0123456789abcdef-0123"),
    ]))
    .unwrap();
    assert_eq!(
        c.name_hash_key.expose(),
        b"another-key-0123456789abcdef-0123"
    );
}

#[test]
fn the_public_url_is_set_or_taken_from_an_issuer_that_is_a_url() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert_eq!(c.public_url, None, "the issuer `authd` is not a URL");
    let c = Config::from_vars(vars(&[SECRET, ("JWT_ISSUER", "https://id.example.com/")])).unwrap();
    assert_eq!(c.public_url.as_deref(), Some("https://id.example.com"));
    let c = Config::from_vars(vars(&[
        SECRET,
        ("JWT_ISSUER", "https://id.example.com"),
        ("PUBLIC_URL", "http://authd.internal:8080/auth/"),
    ]))
    .unwrap();
    assert_eq!(
        c.public_url.as_deref(),
        Some("http://authd.internal:8080/auth")
    );
    for bad in [
        "auth.example.com",
        "ftp://auth.example.com",
        "https://",
        "https://auth.example.com/?x=1",
        "https://auth.example.com/#top",
        "https://user@auth.example.com",
    ] {
        let e = Config::from_vars(vars(&[SECRET, ("PUBLIC_URL", bad)])).unwrap_err();
        assert_eq!(e.variable, "PUBLIC_URL", "{bad}");
    }
}

#[test]
fn retired_keys_need_a_readable_key_and_a_time() {
    let active = [
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", key("ed25519.pem").leak() as &str),
    ];
    let ok = format!("{}@2026-11-28T08:00:00Z", key("ed25519-old-public.pem"));
    let c = Config::from_vars(vars(&[active[0], active[1], ("JWT_RETIRED_KEYS", &ok)])).unwrap();
    assert_eq!(c.jwt.retired_keys.len(), 1);
    for bad in [
        key("ed25519-old-public.pem"),
        format!("{}@yesterday", key("ed25519-old-public.pem")),
        format!("{}@2026-11-28T08:00:00Z", key("README.md")),
    ] {
        let e = Config::from_vars(vars(&[active[0], active[1], ("JWT_RETIRED_KEYS", &bad)]))
            .unwrap_err();
        assert_eq!(e.variable, "JWT_RETIRED_KEYS", "{bad}: {e}");
    }
}

#[test]
fn abuse_settings_have_defaults() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert!(c.trusted_proxies.is_empty());
    assert_eq!(c.throttle.account.threshold, 10);
    assert_eq!(c.throttle.account.window, Duration::from_secs(900));
    assert_eq!(c.throttle.account.max_delay, Duration::from_secs(300));
    assert_eq!(c.throttle.address.threshold, 5);
    assert_eq!(c.throttle.address.max_delay, Duration::from_secs(3600));
    assert_eq!(c.throttle.base_delay, Duration::from_secs(1));
    assert_eq!(c.throttle.register.threshold, 20);
    assert_eq!(c.throttle.register.window, Duration::from_secs(3600));
    assert_eq!(c.throttle.register.max_delay, Duration::from_secs(3600));
    assert_eq!(c.throttle.second_factor.threshold, 5);
    assert_eq!(
        c.throttle.second_factor.window,
        Duration::from_secs(7 * 86_400)
    );
    assert_eq!(
        c.throttle.second_factor.max_delay,
        Duration::from_secs(86_400)
    );
    assert_eq!(c.password_policy.mode, PasswordPolicyMode::Classic);
    assert_eq!(c.password_policy.min_length, 8);
    assert_eq!(c.audit.retention, Duration::from_secs(90 * 86_400));
    assert_eq!(c.audit.purge_interval, Duration::from_secs(3600));
    let nist = Config::from_vars(vars(&[SECRET, ("PASSWORD_POLICY", "NIST")])).unwrap();
    assert_eq!(nist.password_policy.mode, PasswordPolicyMode::Nist);
    assert_eq!(nist.password_policy.min_length, 15);
    assert_eq!(nist.password_policy.min_strength, 3);
}

#[test]
fn trusted_proxies_take_addresses_and_networks() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("TRUSTED_PROXIES", "10.1.0.0/16, 192.0.2.7 ,fd00::/8"),
    ]))
    .unwrap();
    let t = &c.trusted_proxies;
    assert!(t.trusts("10.1.200.3".parse().unwrap()));
    assert!(t.trusts("::ffff:10.1.0.1".parse().unwrap()));
    assert!(!t.trusts("10.2.0.1".parse().unwrap()));
    assert!(t.trusts("192.0.2.7".parse().unwrap()));
    assert!(!t.trusts("192.0.2.8".parse().unwrap()));
    assert!(t.trusts("fd12::1".parse().unwrap()));
    assert!(!t.trusts("fe80::1".parse().unwrap()));
    let all: IpNetwork = "0.0.0.0/0".parse().unwrap();
    assert!(all.contains("203.0.113.9".parse().unwrap()));
}

#[test]
fn operations_settings_have_their_defaults() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert_eq!(c.http_addr, Some("0.0.0.0:8080".parse().unwrap()));
    assert_eq!(c.tls, None);
    assert_eq!(c.otlp, None);
    assert_eq!(
        c.limits,
        GrpcLimits {
            max_message_bytes: 65_536,
            max_header_list_bytes: 16_384,
            concurrency: 1024,
            connection_concurrency: 128,
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    );
    assert_eq!(
        c.connections,
        ConnectionLimits {
            preface_timeout: Duration::from_secs(5),
            max_connections: None,
            http_max_connections: None,
        }
    );
}

#[test]
fn connection_limits_are_read_and_zero_is_refused() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("CONNECTION_PREFACE_TIMEOUT", "750ms"),
        ("MAX_CONNECTIONS", "300"),
        ("HTTP_MAX_CONNECTIONS", "8"),
    ]))
    .unwrap();
    assert_eq!(
        c.connections,
        ConnectionLimits {
            preface_timeout: Duration::from_millis(750),
            max_connections: Some(300),
            http_max_connections: Some(8),
        }
    );
    for (name, value) in [
        ("CONNECTION_PREFACE_TIMEOUT", "0s"),
        ("CONNECTION_PREFACE_TIMEOUT", "soon"),
        ("MAX_CONNECTIONS", "0"),
        ("MAX_CONNECTIONS", "lots"),
        ("HTTP_MAX_CONNECTIONS", "0"),
    ] {
        let e = Config::from_vars(vars(&[SECRET, (name, value)])).unwrap_err();
        assert!(e.to_string().contains(name), "{name}={value}: {e}");
    }
}

#[test]
fn an_empty_http_addr_turns_the_http_listener_off() {
    let c = Config::from_vars(vars(&[SECRET, ("HTTP_ADDR", "")])).unwrap();
    assert_eq!(c.http_addr, None);
    let c = Config::from_vars(vars(&[SECRET, ("HTTP_ADDR", "127.0.0.1:0")])).unwrap();
    assert_eq!(c.http_addr, Some("127.0.0.1:0".parse().unwrap()));
}

#[test]
fn sizes_take_kib_and_mib() {
    for (text, expected) in [
        ("65536", 65_536),
        ("64KiB", 65_536),
        ("64kib", 65_536),
        ("1MiB", 1_048_576),
        ("512B", 512),
    ] {
        let c = Config::from_vars(vars(&[SECRET, ("GRPC_MAX_MESSAGE_SIZE", text)])).unwrap();
        assert_eq!(c.limits.max_message_bytes, expected, "{text}");
    }
}

#[test]
fn tls_needs_both_files_and_mtls_needs_tls() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("TLS_CERT_FILE", "cert.pem"),
        ("TLS_KEY_FILE", "key.pem"),
        ("TLS_CLIENT_CA_FILE", "ca.pem"),
    ]))
    .unwrap();
    let tls = c.tls.unwrap();
    assert_eq!(tls.client_ca_file.as_deref(), Some(Path::new("ca.pem")));
    assert_eq!(tls.reload_interval, Duration::from_secs(30));
    let e = Config::from_vars(vars(&[SECRET, ("TLS_CLIENT_CA_FILE", "ca.pem")])).unwrap_err();
    assert_eq!(e.variable, "TLS_CLIENT_CA_FILE");
    let e = Config::from_vars(vars(&[SECRET, ("TLS_CERT_FILE", "cert.pem")])).unwrap_err();
    assert_eq!(e.variable, "TLS_KEY_FILE");
    let e = Config::from_vars(vars(&[SECRET, ("TLS_KEY_FILE", "key.pem")])).unwrap_err();
    assert_eq!(e.variable, "TLS_CERT_FILE");
}

#[test]
fn otlp_export_follows_the_standard_variables() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
    ]))
    .unwrap();
    let otlp = c.otlp.unwrap();
    assert_eq!(otlp.endpoint, "http://collector:4317");
    assert_eq!(otlp.service_name, "authd");
}

/// A deserializer that only records which fields a struct asks for.
struct FieldNames(Vec<&'static str>);

impl<'de> serde::Deserializer<'de> for &mut FieldNames {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only structs"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.extend_from_slice(fields);
        Err(serde::de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

#[test]
fn settings_lists_exactly_what_authd_reads() {
    let mut fields = FieldNames(Vec::new());
    let _ = RawEnv::deserialize(&mut fields);
    let mut read: Vec<String> = fields.0.iter().map(|f| f.to_ascii_uppercase()).collect();
    read.push("RUST_LOG".to_owned());
    read.sort();
    let mut listed: Vec<String> = SETTINGS.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(read, listed);
}

#[test]
fn secrets_do_not_print() {
    let c = Config::from_vars(vars(&[SECRET, ("DB_PASS", "hunter2hunter2")])).unwrap();
    let printed = format!("{c:?}");
    assert!(!printed.contains(SECRET.1));
    assert!(!printed.contains("hunter2hunter2"));
}

#[test]
fn settings_of_a_store_not_in_use_are_still_checked() {
    // Embedded: neither MySQL nor Redis is used, and a typo in their settings still
    // stops start-up, naming the variable.
    for (variable, value) in [
        ("DB_POOL_SIZE", "ten"),
        ("DB_POOL_SIZE", "0"),
        ("DB_ACQUIRE_TIMEOUT", "soon"),
        ("DB_QUERY_TIMEOUT", "0s"),
        ("REDIS_CONNECT_TIMEOUT", "fast"),
        ("REDIS_COMMAND_TIMEOUT", "0s"),
        ("REDIS_RETRY_INTERVAL", "-1s"),
        ("REDIS_POOL_SIZE", "0"),
        ("REDIS_FAILURE_MODE", "maybe"),
    ] {
        let e = Config::from_vars(vars(&[(variable, value)])).unwrap_err();
        assert_eq!(e.variable, variable, "{variable}={value}: {e}");
    }
    let c = Config::from_vars(Vec::new()).unwrap();
    assert!(matches!(c.users, UsersBackend::Sqlite { .. }));
    assert!(matches!(c.sessions, SessionsBackend::Memory));
}

#[test]
fn a_bad_key_names_the_variable_that_named_it() {
    let dir = std::env::temp_dir().join(format!("authd-config-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(
        &not_a_key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let not_a_key = not_a_key.to_str().unwrap();
    let e = Config::from_vars(vars(&[
        ("JWT_ALGORITHM", "EdDSA"),
        ("JWT_PRIVATE_KEY_FILE", not_a_key),
    ]))
    .unwrap_err();
    assert_eq!(e.variable, "JWT_PRIVATE_KEY_FILE", "{e}");
    let retired = format!("{not_a_key}@2026-11-28T08:00:00Z");
    let e = Config::from_vars(vars(&[SECRET, ("JWT_RETIRED_KEYS", retired.as_str())])).unwrap_err();
    assert_eq!(e.variable, "JWT_RETIRED_KEYS", "{e}");
    assert!(e.problem.starts_with(not_a_key), "{e}");
}

#[test]
fn the_keys_are_built_once_with_the_configuration() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    let issued = c.keys.issue("u", "name", "s", 1_000).unwrap();
    // A clone shares the keys: nothing builds them a second time.
    let copy = c.clone();
    assert!(std::sync::Arc::ptr_eq(&c.keys, &copy.keys));
    assert!(copy.keys.verify(&issued.token, 1_001).is_ok());
}

#[test]
fn refresh_settings_default_to_a_month_and_thirty_seconds() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert_eq!(
        c.refresh.session_max_lifetime,
        Duration::from_secs(30 * 86_400)
    );
    assert_eq!(c.refresh.reuse_grace, Duration::from_secs(30));
    // The default JWT_TTL fits inside the default lifetime: no token is cut short.
    assert!(c.refresh.session_max_lifetime >= c.jwt.ttl);
}

#[test]
fn refresh_settings_are_checked() {
    let c = Config::from_vars(vars(&[
        SECRET,
        ("SESSION_MAX_LIFETIME", "12h"),
        ("REFRESH_REUSE_GRACE", "0s"),
    ]))
    .unwrap();
    assert_eq!(c.refresh.session_max_lifetime, Duration::from_secs(43_200));
    assert_eq!(c.refresh.reuse_grace, Duration::ZERO);
    for (var, value) in [
        ("SESSION_MAX_LIFETIME", "0s"),
        ("SESSION_MAX_LIFETIME", "forever"),
        ("REFRESH_REUSE_GRACE", "6m"),
        ("REFRESH_REUSE_GRACE", "soon"),
    ] {
        let e = Config::from_vars(vars(&[SECRET, (var, value)])).unwrap_err();
        assert_eq!(e.variable, var, "{value}");
    }
}

#[test]
fn admin_client_sans_are_a_list_and_need_client_certificates() {
    let tls = [
        ("TLS_CERT_FILE", "/c.pem"),
        ("TLS_KEY_FILE", "/k.pem"),
        ("TLS_CLIENT_CA_FILE", "/ca.pem"),
    ];
    let with = |extra: &[(&str, &str)]| {
        Config::from_vars(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    };
    let mut vars = tls.to_vec();
    vars.push((
        "ADMIN_CLIENT_SANS",
        " ops.example.com , spiffe://example.org/ops,,",
    ));
    assert_eq!(
        with(&vars).unwrap().admin_client_sans,
        ["ops.example.com", "spiffe://example.org/ops"]
    );
    assert!(with(&tls).unwrap().admin_client_sans.is_empty());
    let e = with(&[("ADMIN_CLIENT_SANS", "ops.example.com")]).unwrap_err();
    assert_eq!(e.variable, "ADMIN_CLIENT_SANS");
    assert!(e.problem.contains("TLS_CLIENT_CA_FILE"), "{e}");
}

fn single_url(redis: &crate::config::RedisConfig) -> String {
    match &redis.topology {
        crate::config::RedisTopology::Single(url) => url.expose().clone(),
        other => panic!("not one server: {other:?}"),
    }
}

fn redis_of(pairs: &[(&str, &str)]) -> crate::config::RedisConfig {
    let mut all = vec![SECRET];
    all.extend_from_slice(pairs);
    match Config::from_vars(vars(&all)).unwrap().sessions {
        SessionsBackend::Redis(redis) => redis,
        SessionsBackend::Memory => panic!("not redis"),
    }
}

fn redis_error(pairs: &[(&str, &str)]) -> (String, String) {
    let mut all = vec![SECRET];
    all.extend_from_slice(pairs);
    let e = Config::from_vars(vars(&all)).unwrap_err();
    (e.variable.to_string(), e.to_string())
}

#[test]
fn a_cluster_is_named_by_its_nodes_or_a_cluster_url_with_the_password_in_each_node() {
    use crate::config::RedisTopology;
    for pairs in [
        vec![
            ("REDIS_CLUSTER_NODES", "a:7000, b:7001,c:7002"),
            ("REDIS_PASSWORD", "p@ss"),
        ],
        vec![("REDIS_URL", "redis+cluster://:p%40ss@a:7000,b:7001,c:7002/")],
    ] {
        let redis = redis_of(&pairs);
        let RedisTopology::Cluster(nodes) = &redis.topology else {
            panic!("not a cluster: {:?}", redis.topology)
        };
        assert_eq!(
            nodes.expose(),
            &[
                "redis://:p%40ss@a:7000/",
                "redis://:p%40ss@b:7001/",
                "redis://:p%40ss@c:7002/"
            ]
        );
        assert!(
            !format!("{redis:?}").contains("p%40ss"),
            "the password is kept secret"
        );
    }
    let redis = redis_of(&[("REDIS_URL", "rediss+cluster://a:7000")]);
    let RedisTopology::Cluster(nodes) = &redis.topology else {
        panic!("not a cluster")
    };
    assert_eq!(nodes.expose(), &["rediss://a:7000/"]);
}

#[test]
fn sentinel_is_named_by_its_sentinels_and_the_primary_s_name_or_a_sentinel_url() {
    use crate::config::RedisTopology;
    for (pairs, db) in [
        (
            vec![
                ("REDIS_SENTINELS", "s1:26379,s2:26379"),
                ("REDIS_SENTINEL_MASTER", "authd"),
                ("REDIS_PASSWORD", "pw"),
            ],
            "0",
        ),
        (
            vec![(
                "REDIS_URL",
                "redis+sentinel://:pw@s1:26379,s2:26379/authd/3",
            )],
            "3",
        ),
        (
            vec![
                ("REDIS_URL", "redis+sentinel://:pw@s1:26379,s2:26379"),
                ("REDIS_SENTINEL_MASTER", "authd"),
            ],
            "0",
        ),
    ] {
        let redis = redis_of(&pairs);
        let RedisTopology::Sentinel {
            sentinels,
            master,
            primary,
        } = &redis.topology
        else {
            panic!("not sentinel: {:?}", redis.topology)
        };
        assert_eq!(sentinels, &["redis://s1:26379/", "redis://s2:26379/"]);
        assert_eq!(master, "authd");
        assert_eq!(primary.expose(), &format!("redis://:pw@primary/{db}"));
    }
}

#[test]
fn a_bad_redis_topology_stops_start_up_with_one_line_naming_the_variable() {
    for (pairs, variable) in [
        (
            vec![
                ("REDIS_CLUSTER_NODES", "a:1"),
                ("REDIS_URL", "redis://r:1/"),
            ],
            "REDIS_URL",
        ),
        (
            vec![("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_SENTINELS", "s:1")],
            "REDIS_SENTINELS",
        ),
        (
            vec![("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_ADDR", "r:1")],
            "REDIS_ADDR",
        ),
        (vec![("REDIS_SENTINELS", "s:1")], "REDIS_SENTINEL_MASTER"),
        (
            vec![("REDIS_SENTINEL_MASTER", "m")],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            vec![
                ("REDIS_URL", "redis://r:1/"),
                ("REDIS_SENTINEL_MASTER", "m"),
            ],
            "REDIS_SENTINEL_MASTER",
        ),
        (
            vec![
                ("REDIS_URL", "redis+sentinel://s:1/a"),
                ("REDIS_SENTINEL_MASTER", "b"),
            ],
            "REDIS_SENTINEL_MASTER",
        ),
        (vec![("REDIS_URL", "redis+sentinel://s:1")], "REDIS_URL"),
        (vec![("REDIS_URL", "redis+sentinel://s:1/m/x")], "REDIS_URL"),
        (vec![("REDIS_URL", "redis+cluster://a:1/2")], "REDIS_URL"),
        (vec![("REDIS_URL", "redis+cluster://")], "REDIS_URL"),
        (vec![("REDIS_URL", "valkey://a:1")], "REDIS_URL"),
        (vec![("REDIS_CLUSTER_NODES", "a")], "REDIS_CLUSTER_NODES"),
        (
            vec![("REDIS_CLUSTER_NODES", "a:1,b:x")],
            "REDIS_CLUSTER_NODES",
        ),
        (vec![("REDIS_CLUSTER_NODES", " , ")], "REDIS_CLUSTER_NODES"),
        (
            vec![("REDIS_SENTINELS", "u@s:1"), ("REDIS_SENTINEL_MASTER", "m")],
            "REDIS_SENTINELS",
        ),
        (vec![("REDIS_WAIT_REPLICAS", "1")], "REDIS_WAIT_REPLICAS"),
        (
            vec![
                ("REDIS_URL", "redis://r:1/"),
                ("REDIS_WAIT_REPLICAS", "one"),
            ],
            "REDIS_WAIT_REPLICAS",
        ),
        (
            vec![("REDIS_URL", "redis://r:1/"), ("REDIS_WAIT_TIMEOUT", "1s")],
            "REDIS_WAIT_TIMEOUT",
        ),
        (
            vec![
                ("REDIS_URL", "redis://r:1/"),
                ("REDIS_WAIT_REPLICAS", "1"),
                ("REDIS_WAIT_TIMEOUT", "0s"),
            ],
            "REDIS_WAIT_TIMEOUT",
        ),
    ] {
        let (got, line) = redis_error(&pairs);
        assert_eq!(got, variable, "{pairs:?}: {line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}

#[test]
fn revocations_wait_for_replicas_only_when_asked() {
    use crate::config::WaitReplicas;
    assert_eq!(redis_of(&[("REDIS_URL", "redis://r:1/")]).wait, None);
    assert_eq!(
        redis_of(&[("REDIS_URL", "redis://r:1/"), ("REDIS_WAIT_REPLICAS", "0")]).wait,
        None
    );
    assert_eq!(
        redis_of(&[("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_WAIT_REPLICAS", "1")]).wait,
        Some(WaitReplicas {
            replicas: 1,
            timeout: Duration::from_millis(200)
        })
    );
    assert_eq!(
        redis_of(&[
            ("REDIS_URL", "redis://r:1/"),
            ("REDIS_WAIT_REPLICAS", "2"),
            ("REDIS_WAIT_TIMEOUT", "1s")
        ])
        .wait,
        Some(WaitReplicas {
            replicas: 2,
            timeout: Duration::from_secs(1)
        })
    );
}

#[test]
fn redis_tls_files_go_with_a_tls_scheme_and_a_client_certificate_with_its_key() {
    use crate::config::RedisTls;
    use std::path::PathBuf;
    for url in [
        "rediss://r:6380/",
        "rediss+cluster://a:7000,b:7001",
        "rediss+sentinel://s1:26379/authd",
    ] {
        let redis = redis_of(&[
            ("REDIS_URL", url),
            ("REDIS_TLS_CA_FILE", "/ca.pem"),
            ("REDIS_TLS_CERT_FILE", "/c.pem"),
            ("REDIS_TLS_KEY_FILE", "/k.pem"),
        ]);
        assert_eq!(
            redis.tls,
            Some(Box::new(RedisTls {
                ca_file: Some(PathBuf::from("/ca.pem")),
                client: Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem"))),
            })),
            "{url}"
        );
        assert!(redis.topology.uses_tls(), "{url}");
    }
    assert_eq!(redis_of(&[("REDIS_URL", "rediss://r:6380/")]).tls, None);
    assert!(
        !redis_of(&[("REDIS_URL", "redis://r:6379/")])
            .topology
            .uses_tls()
    );
    for (pairs, variable, says) in [
        (
            vec![
                ("REDIS_URL", "redis://r:6379/"),
                ("REDIS_TLS_CA_FILE", "/ca.pem"),
            ],
            "REDIS_TLS_CA_FILE",
            "not reached over TLS",
        ),
        (
            vec![
                ("REDIS_CLUSTER_NODES", "a:7000"),
                ("REDIS_TLS_CERT_FILE", "/c.pem"),
                ("REDIS_TLS_KEY_FILE", "/k.pem"),
            ],
            "REDIS_TLS_CERT_FILE",
            "not reached over TLS",
        ),
        (
            vec![
                ("REDIS_URL", "rediss://r:6380/"),
                ("REDIS_TLS_CERT_FILE", "/c.pem"),
            ],
            "REDIS_TLS_CERT_FILE",
            "REDIS_TLS_KEY_FILE is not",
        ),
        (
            vec![
                ("REDIS_URL", "rediss://r:6380/"),
                ("REDIS_TLS_KEY_FILE", "/k.pem"),
            ],
            "REDIS_TLS_KEY_FILE",
            "REDIS_TLS_CERT_FILE is not",
        ),
        (
            vec![("REDIS_TLS_CA_FILE", "/ca.pem")],
            "REDIS_TLS_CA_FILE",
            "not reached over TLS",
        ),
    ] {
        let (var, message) = redis_error(&pairs);
        assert_eq!(var, variable, "{pairs:?}");
        assert!(message.contains(says), "{pairs:?}: {message}");
    }
}

#[test]
fn the_session_cache_is_off_by_default_and_its_settings_are_checked() {
    let c = Config::from_vars(vars(&[SECRET])).unwrap();
    assert_eq!(
        c.session_cache,
        crate::config::SessionCacheConfig::default()
    );
    assert!(!c.session_cache.enabled);
    assert_eq!(c.session_cache.ttl, Duration::from_secs(30));
    assert_eq!(c.session_cache.max_entries, 100_000);
    let c = Config::from_vars(vars(&[
        SECRET,
        ("SESSION_CACHE", "ON"),
        ("SESSION_CACHE_TTL", "10m"),
        ("SESSION_CACHE_MAX_ENTRIES", "7"),
    ]))
    .unwrap();
    assert!(c.session_cache.enabled);
    assert_eq!(c.session_cache.ttl, Duration::from_secs(600));
    assert_eq!(c.session_cache.max_entries, 7);
    assert_eq!(
        Config::from_vars(vars(&[SECRET, ("SESSION_CACHE_TTL", "1s")]))
            .unwrap()
            .session_cache
            .ttl,
        Duration::from_secs(1)
    );
    for (var, value) in [
        ("SESSION_CACHE", "yes"),
        ("SESSION_CACHE", "strict"),
        ("SESSION_CACHE_TTL", "0s"),
        ("SESSION_CACHE_TTL", "500ms"),
        ("SESSION_CACHE_TTL", "1500ms"),
        ("SESSION_CACHE_TTL", "11m"),
        ("SESSION_CACHE_TTL", "soon"),
        ("SESSION_CACHE_MAX_ENTRIES", "0"),
        ("SESSION_CACHE_MAX_ENTRIES", "-1"),
        ("SESSION_CACHE_MAX_ENTRIES", "many"),
    ] {
        let e = Config::from_vars(vars(&[SECRET, (var, value)])).unwrap_err();
        assert_eq!(e.variable, var, "{value}");
    }
}
