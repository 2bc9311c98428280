//! The deployment files (compose, Kubernetes, Dockerfile, .env.example): no Docker engine
//! runs here, so they are parsed and checked to name only settings authd reads, and to
//! keep the properties operators rely on.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use authd::config::SETTINGS;
use serde::Deserialize;
use serde_norway::Value;

use crate::support::SECRET;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every YAML document in a file.
fn documents(path: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn k8s_documents() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| {
            let name = format!("deploy/k8s/{}", p.file_name().unwrap().to_str().unwrap());
            documents(&name).into_iter().map(move |d| (name.clone(), d))
        })
        .collect()
}

fn str_of<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, key| v.get(*key))
        .and_then(Value::as_str)
}

/// The strings of a YAML list.
#[track_caller]
fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .expect("a list")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

#[track_caller]
fn assert_all_read_by_authd<'a>(what: &str, names: impl IntoIterator<Item = &'a str>) {
    let unknown: BTreeSet<&str> = names
        .into_iter()
        .filter(|n| !SETTINGS.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} sets what authd does not read: {unknown:?}"
    );
}

/// The `NAME` of every `${NAME}`, `${NAME:-x}`, `${NAME:?x}` in `text` (not `$${…}`).
fn interpolated(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let escaped = at > 0 && rest.as_bytes()[at - 1] == b'$';
        let after = &rest[at + 2..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !escaped {
            names.push(name);
        }
        rest = after;
    }
    names
}

#[test]
fn compose_runs_authd_mysql_and_redis_with_only_authd_settings() {
    let compose = documents("docker-compose.yml").remove(0);
    let services = &compose["services"];
    let authd = &services["authd"];
    let environment = authd["environment"].as_mapping().expect("environment map");
    assert_all_read_by_authd(
        "docker-compose.yml authd.environment",
        environment.keys().filter_map(Value::as_str),
    );
    // Values come from .env, which authd itself reads too.
    let names = interpolated(&read("docker-compose.yml"));
    assert_all_read_by_authd("docker-compose.yml ${…}", names.iter().map(String::as_str));

    for dependency in ["mysql", "redis"] {
        assert_eq!(
            str_of(authd, &["depends_on", dependency, "condition"]),
            Some("service_healthy"),
            "authd does not wait for {dependency}"
        );
    }
    for service in ["authd", "mysql", "redis"] {
        assert!(
            services[service]["healthcheck"]["test"].is_sequence(),
            "{service} has no health check"
        );
    }
    let healthcheck = strings(&authd["healthcheck"]["test"]);
    assert!(healthcheck.contains(&"healthcheck"), "{healthcheck:?}");
    assert!(
        str_of(&services["mysql"], &["image"])
            .unwrap()
            .starts_with("mysql:8"),
        "not MySQL 8"
    );
    assert!(
        str_of(&services["redis"], &["image"])
            .unwrap()
            .starts_with("redis:7")
    );
    let redis = strings(&services["redis"]["command"]);
    assert!(
        redis.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{redis:?}"
    );
    assert!(
        redis
            .windows(2)
            .any(|w| w == ["--maxmemory-policy", "noeviction"]),
        "{redis:?}"
    );
}

#[test]
fn env_example_and_dockerfile_name_only_authd_settings() {
    let example = read(".env.example");
    let names: Vec<&str> = example
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("NAME=value").0)
        .collect();
    assert!(names.contains(&"JWT_SECRET"));
    assert_all_read_by_authd(".env.example", names);

    let dockerfile = read("Dockerfile");
    let env_names: Vec<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .map(|kv| kv.split_once('=').expect("ENV NAME=value").0)
        .collect();
    assert!(!env_names.is_empty());
    assert_all_read_by_authd("Dockerfile ENV", env_names);
    assert!(
        dockerfile.matches("\nFROM ").count() >= 2,
        "not multi-stage"
    );
    assert!(dockerfile.contains("\nUSER 10001"), "runs as root");
    let healthcheck = dockerfile
        .split("\nHEALTHCHECK ")
        .nth(1)
        .expect("a HEALTHCHECK");
    assert!(healthcheck.contains("\"healthcheck\"]"), "{healthcheck}");
}

#[test]
fn kubernetes_files_deploy_authd_with_probes_budget_and_autoscaler() {
    let documents = k8s_documents();
    let kinds: BTreeSet<&str> = documents
        .iter()
        .filter_map(|(_, d)| str_of(d, &["kind"]))
        .collect();
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/k8s: {kinds:?}");
    }

    for (file, doc) in &documents {
        if str_of(doc, &["kind"]) == Some("ConfigMap") {
            let data = doc["data"].as_mapping().expect("ConfigMap data");
            assert_all_read_by_authd(file, data.keys().filter_map(Value::as_str));
        }
    }

    let (file, deployment) = documents
        .iter()
        .find(|(_, d)| str_of(d, &["kind"]) == Some("Deployment"))
        .unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_sequence().expect("env");
    assert_all_read_by_authd(file, env.iter().filter_map(|e| str_of(e, &["name"])));
    let jwt = env
        .iter()
        .find(|e| str_of(e, &["name"]) == Some("JWT_SECRET"))
        .expect("JWT_SECRET set");
    assert!(
        str_of(jwt, &["valueFrom", "secretKeyRef", "name"]).is_some(),
        "JWT_SECRET must come from a Secret"
    );
    assert!(jwt.get("value").is_none(), "JWT_SECRET written in the file");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_u64(),
            Some(50051),
            "{probe} is not a gRPC probe on the gRPC port"
        );
    }
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let config = documents
        .iter()
        .find(|(_, d)| str_of(d, &["kind"]) == Some("ConfigMap"))
        .unwrap();
    let shutdown_grace =
        humantime::parse_duration(str_of(&config.1, &["data", "SHUTDOWN_GRACE"]).unwrap()).unwrap();
    assert!(
        grace > shutdown_grace.as_secs() + 5,
        "pods are killed before SHUTDOWN_GRACE (and the preStop pause) ends"
    );

    let selector = |kind: &str| {
        documents
            .iter()
            .find(|(_, d)| str_of(d, &["kind"]) == Some(kind))
            .map(|(_, d)| d["spec"]["selector"].clone())
            .unwrap()
    };
    let pods = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(selector("Service"), *pods);
    assert_eq!(selector("PodDisruptionBudget")["matchLabels"], *pods);
    let hpa = documents
        .iter()
        .find(|(_, d)| str_of(d, &["kind"]) == Some("HorizontalPodAutoscaler"))
        .unwrap();
    assert_eq!(
        str_of(&hpa.1, &["spec", "scaleTargetRef", "name"]),
        str_of(deployment, &["metadata", "name"])
    );
}

/// The settings the compose file's comment gives for its Sentinel profile.
fn compose_sentinel_settings(compose: &str) -> Vec<(String, String)> {
    compose
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn compose_offers_sentinel_as_a_profile_that_authd_is_configured_for() {
    let text = read("docker-compose.yml");
    let compose = documents("docker-compose.yml").remove(0);
    let services = &compose["services"];
    let settings = compose_sentinel_settings(&text);
    assert_all_read_by_authd(
        "docker-compose.yml sentinel settings",
        settings.iter().map(|(k, _)| k.as_str()),
    );
    let value = |name: &str| {
        settings
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} in the compose comment"))
    };
    // Every sentinel named is a service of the profile, and watches the primary under
    // the name authd asks for.
    let sentinels = value("REDIS_SENTINELS");
    let master = value("REDIS_SENTINEL_MASTER");
    for sentinel in sentinels.split(',') {
        let (host, port) = sentinel.split_once(':').unwrap();
        let service = &services[host];
        assert_eq!(
            strings(&service["profiles"]),
            ["sentinel"],
            "{host} is not in the sentinel profile"
        );
        let script = strings(&service["command"]).join("\n");
        assert!(script.contains(&format!("port {port}")), "{script}");
        assert!(
            script.contains(&format!("sentinel monitor {master} redis 6379")),
            "{script}"
        );
    }
    let replica = strings(&services["redis-replica"]["command"]);
    assert!(
        replica
            .windows(3)
            .any(|w| w == ["--replicaof", "redis", "6379"]),
        "{replica:?}"
    );
    // authd passes each of them through, and with REDIS_ADDR emptied it starts on them.
    let environment = services["authd"]["environment"].as_mapping().unwrap();
    for name in [
        "REDIS_SENTINELS",
        "REDIS_SENTINEL_MASTER",
        "REDIS_WAIT_REPLICAS",
    ] {
        assert!(
            environment.contains_key(name),
            "authd's environment does not pass {name}"
        );
    }
    let mut vars = settings;
    vars.push(("JWT_SECRET".into(), SECRET.into()));
    let config = authd::config::Config::from_vars(vars).expect("the sentinel settings");
    let authd::config::SessionsBackend::Redis(redis) = config.sessions else {
        panic!("not Redis")
    };
    assert!(matches!(
        redis.topology,
        authd::config::RedisTopology::Sentinel { .. }
    ));
    assert_eq!(redis.wait.map(|w| w.replicas), Some(1));
}

#[test]
fn the_kubernetes_sentinel_overlay_points_authd_at_the_sentinels_it_deploys() {
    let kustomization = documents("deploy/k8s/sentinel/kustomization.yaml").remove(0);
    assert!(strings(&kustomization["resources"]).contains(&"../"));
    let redis = documents("deploy/k8s/sentinel/redis-sentinel.yaml");
    let statefulset = |name: &str| {
        redis
            .iter()
            .find(|d| {
                str_of(d, &["kind"]) == Some("StatefulSet")
                    && str_of(d, &["metadata", "name"]) == Some(name)
            })
            .unwrap_or_else(|| panic!("no StatefulSet {name}"))
    };
    let sentinels = statefulset("redis-sentinel");
    assert_eq!(sentinels["spec"]["replicas"].as_u64(), Some(3));
    assert!(statefulset("redis")["spec"]["replicas"].as_u64().unwrap() >= 2);
    let script =
        strings(&sentinels["spec"]["template"]["spec"]["containers"][0]["args"]).join("\n");

    // The base ConfigMap with the overlay's JSON patch applied, as kustomize would.
    let (_, base) = k8s_documents()
        .into_iter()
        .find(|(_, d)| str_of(d, &["kind"]) == Some("ConfigMap"))
        .unwrap();
    let mut data: Vec<(String, String)> = base["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let patches = kustomization["patches"].as_sequence().unwrap();
    let patch: Vec<Value> =
        serde_norway::from_str(str_of(&patches[0], &["patch"]).unwrap()).unwrap();
    for op in &patch {
        let key = str_of(op, &["path"]).unwrap().trim_start_matches("/data/");
        data.retain(|(k, _)| k != key);
        if str_of(op, &["op"]) == Some("add") {
            data.push((key.to_owned(), str_of(op, &["value"]).unwrap().to_owned()));
        }
    }
    assert_all_read_by_authd(
        "deploy/k8s/sentinel patch",
        data.iter().map(|(k, _)| k.as_str()),
    );
    let get = |name: &str| data.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let master = get("REDIS_SENTINEL_MASTER");
    assert!(
        script.contains(&format!("sentinel monitor {master} ")),
        "the sentinels watch another name than {master}: {script}"
    );
    let named = get("REDIS_SENTINELS");
    assert_eq!(named.split(',').count(), 3, "{named}");
    for (i, sentinel) in named.split(',').enumerate() {
        assert_eq!(sentinel, format!("redis-sentinel-{i}.redis-sentinel:26379"));
    }
    data.push(("JWT_SECRET".into(), SECRET.into()));
    let config = authd::config::Config::from_vars(data).expect("the overlay's settings");
    let authd::config::SessionsBackend::Redis(redis) = config.sessions else {
        panic!("not Redis")
    };
    assert!(matches!(
        redis.topology,
        authd::config::RedisTopology::Sentinel { .. }
    ));
    assert_eq!(redis.wait.map(|w| w.replicas), Some(1));
}
