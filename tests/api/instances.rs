//! Several instances of one deployment (issue #9): two `authd` processes sharing
//! MariaDB and Redis (or a Redis Cluster) must agree at once, and race each other
//! safely.

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::InvalidReason;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::support::binary::Authd;
use crate::support::*;

/// Two `authd` processes on one fresh database and key prefix; the database is
/// dropped with it.
struct Deployment {
    a: Authd,
    b: Authd,
    db_name: String,
}

impl Deployment {
    async fn start() -> Self {
        Self::start_on(Backend::MySqlRedis).await
    }

    /// On the shared Redis, or ([`Backend::MySqlCluster`]) the shared Redis Cluster.
    async fn start_on(backend: Backend) -> Self {
        let (db_name, key_prefix) = fresh_names();
        let db_url = format!("{}/{db_name}", mysql_base());
        let redis_url = match backend {
            Backend::MySqlCluster => format!(
                "redis+cluster://{}",
                tokio::task::block_in_place(|| shared_cluster().seeds())
            ),
            _ => redis_base(),
        };
        let env = [
            ("DATABASE_URL", db_url.as_str()),
            ("REDIS_URL", &redis_url),
            ("REDIS_KEY_PREFIX", &key_prefix),
            // Room for every racer's hash at once: the race is the point, not shedding.
            ("BCRYPT_QUEUE", "256"),
            ("BCRYPT_MAX_PER_ADDRESS", "256"),
            ("THROTTLE_REGISTER_THRESHOLD", REGISTER_THRESHOLD),
        ];
        // One after the other: the first creates the database and migrates it.
        let a = tokio::task::block_in_place(|| Authd::start(&env));
        let b = tokio::task::block_in_place(|| Authd::start(&env));
        Self { a, b, db_name }
    }

    async fn clients(&self) -> (AuthServiceClient<Channel>, AuthServiceClient<Channel>) {
        (client(&self.a).await, client(&self.b).await)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        drop_database(&self.db_name);
    }
}

async fn client(authd: &Authd) -> AuthServiceClient<Channel> {
    AuthServiceClient::connect(format!("http://{}", authd.addr))
        .await
        .unwrap()
}

async fn reason(client: &AuthServiceClient<Channel>, token: &str) -> InvalidReason {
    client
        .clone()
        .validate_token(pb::ValidateTokenRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .reason()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_or_password_change_on_one_process_is_honoured_by_the_other_at_once() {
    logout_or_password_change_honoured_at_once(Backend::MySqlRedis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_logout_or_password_change_on_one_process_is_honoured_by_the_other() {
    logout_or_password_change_honoured_at_once(Backend::MySqlCluster).await;
}

async fn logout_or_password_change_honoured_at_once(backend: Backend) {
    let deployment = Deployment::start_on(backend).await;
    let (a, b) = deployment.clients().await;
    register_on(&a, "twin", PASSWORD).await.unwrap();
    let phone = login_on(&a, "twin", PASSWORD).await.unwrap();
    let laptop = login_on(&b, "twin", PASSWORD).await.unwrap();
    let tablet = login_on(&a, "twin", PASSWORD).await.unwrap();
    assert_eq!(
        reason(&b, &phone.access_token).await,
        InvalidReason::Unspecified
    );

    // Logout on A: B refuses the token on the very next call.
    a.clone()
        .logout(bearer(&phone.access_token, pb::LogoutRequest {}))
        .await
        .unwrap();
    assert_eq!(
        reason(&b, &phone.access_token).await,
        InvalidReason::Revoked
    );

    // Password change on B: A refuses the other sessions and the old password at once.
    b.clone()
        .change_password(bearer(
            &laptop.access_token,
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: "Brand-New-Pass-7".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_ne!(
        reason(&a, &tablet.access_token).await,
        InvalidReason::Unspecified
    );
    assert_eq!(
        reason(&a, &laptop.access_token).await,
        InvalidReason::Unspecified
    );
    assert_code(login_on(&a, "twin", PASSWORD).await, Code::Unauthenticated);
    login_on(&a, "twin", "Brand-New-Pass-7").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_race_between_two_processes_makes_exactly_one_user() {
    let deployment = Deployment::start().await;
    let (a, b) = deployment.clients().await;
    const ROUNDS: usize = 40;
    // Every round at once, each name sent to both processes at once (in two spellings:
    // usernames are case-insensitive).
    let races = (0..ROUNDS).map(|i| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let lower = format!("racer_{i}");
            let upper = lower.to_uppercase();
            let (x, y) = tokio::join!(
                register_on(&a, &lower, PASSWORD),
                register_on(&b, &upper, PASSWORD)
            );
            (i, x, y)
        }
    });
    for (i, x, y) in futures::future::join_all(races).await {
        let codes = [
            x.as_ref().err().map(Status::code),
            y.as_ref().err().map(Status::code),
        ];
        assert!(
            codes == [None, Some(Code::AlreadyExists)]
                || codes == [Some(Code::AlreadyExists), None],
            "round {i}: {x:?} / {y:?}"
        );
        let winner = x.or(y).unwrap();
        assert_eq!(winner.username, format!("racer_{i}"));
    }
    let db = sqlx::MySqlPool::connect(&format!("{}/{}", mysql_base(), deployment.db_name))
        .await
        .unwrap();
    let (users, names): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT LOWER(username)) FROM users")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!((users, names), (ROUNDS as i64, ROUNDS as i64));
}
