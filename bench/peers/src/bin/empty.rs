//! The yardstick's denominator: `GET /` answers 200 with an empty body.
//! Same actix-web as sessiongate, one worker, nothing else.
//!
//!     peer-empty 127.0.0.1:PORT

use actix_web::{App, HttpResponse, HttpServer, web};

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".to_owned());
    HttpServer::new(|| App::new().route("/", web::get().to(HttpResponse::Ok)))
        .workers(1)
        .bind(listen)?
        .run()
        .await
}
