//! Logging set-up shared by every binary.

/// Starts `env_logger` on stderr. The level defaults to `warn` so that
/// nothing but problems is printed unless `RUST_LOG` asks for more.
pub fn init() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
}
