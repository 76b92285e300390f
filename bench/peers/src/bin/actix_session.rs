//! The peer "the way most Rust teams would": actix-web + actix-session's
//! `RedisSessionStore`, every setting left at its default (private, i.e.
//! encrypted, cookie `id`; browser-session lifecycle; TTL extended only when
//! the state changes, so reading a session is one Redis GET).
//!
//!     peer-actix-session 127.0.0.1:PORT redis://127.0.0.1:RPORT
//!
//! `POST /login?user=ID` puts `user_id` in a new session (the Set-Cookie is
//! what bench/yardstick seeds with); `GET /` answers 200 when the session
//! holds a user id, 401 otherwise.

use actix_session::{Session, SessionMiddleware, storage::RedisSessionStore};
use actix_web::{App, HttpResponse, HttpServer, cookie::Key, web};

#[derive(serde::Deserialize)]
struct Login {
    user: String,
}

async fn login(session: Session, q: web::Query<Login>) -> HttpResponse {
    match session.insert("user_id", &q.user) {
        Ok(()) => HttpResponse::Ok().finish(),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

async fn check(session: Session) -> HttpResponse {
    match session.get::<String>("user_id") {
        Ok(Some(_)) => HttpResponse::Ok().finish(),
        _ => HttpResponse::Unauthorized().finish(),
    }
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8082".to_owned());
    let redis_url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6390".to_owned());
    let store = RedisSessionStore::new(redis_url)
        .await
        .map_err(|e| std::io::Error::other(format!("redis: {e}")))?;
    // A fresh key per start: the cookies of one run are seeded by that run.
    let key = Key::generate();
    HttpServer::new(move || {
        App::new()
            .wrap(SessionMiddleware::new(store.clone(), key.clone()))
            .route("/", web::get().to(check))
            .route("/login", web::post().to(login))
    })
    .workers(1)
    .bind(listen)?
    .run()
    .await
}
