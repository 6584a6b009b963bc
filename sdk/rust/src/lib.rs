//! Write Warden policy plugins in Rust.
//!
//! A plugin fills one slot. Implement the slot's trait ([`Auth`], [`Sanitizer`] with an
//! [`OutputFilter`], [`MetricsPolicy`]) for a type built from a typed configuration, and
//! export it with the slot's macro. The configuration the operator gives (a JSON object) is
//! parsed into your `Config` type once per instance, before the first call:
//!
//! ```
//! use warden_policy::auth::{Principal, Refusal, RequestInfo};
//!
//! #[derive(serde::Deserialize)]
//! struct Config { token: String }
//!
//! struct Token(Config);
//!
//! impl warden_policy::Auth for Token {
//!     type Config = Config;
//!     fn new(config: Config) -> Result<Self, String> { Ok(Self(config)) }
//!     fn authenticate(&self, request: &RequestInfo) -> Result<Principal, Refusal> {
//!         match warden_policy::bearer(request) {
//!             Some(t) if warden_policy::same_secret(t, &self.0.token) => {
//!                 Ok(warden_policy::principal("client", ["inference"]))
//!             }
//!             Some(_) => Err(warden_policy::unauthorized("invalid_api_key", "invalid token").into()),
//!             None => Err(warden_policy::unauthorized("missing_api_key", "send a bearer token").into()),
//!         }
//!     }
//! }
//!
//! warden_policy::export_auth!(Token);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`: the result is a component.
//! The WIT contract it targets is vendored in this crate (`wit/0.1.0`), and
//! [`WIT_VERSION`] says which; `warden plugin inspect` shows it, and a host that serves
//! another version refuses the plugin, naming both.
// The wit-bindgen glue expands to `unsafe` ABI code.
#![allow(unsafe_code)]

#[doc(hidden)]
pub use serde_json as __serde_json;
#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The version of the `warden:policy` WIT package this SDK targets.
pub const WIT_VERSION: &str = "0.1.0";

/// The auth world: its types and the export glue [`export_auth!`] uses.
pub mod auth {
    pub use warden_policy_auth::exports::warden::policy::auth::Guest;
    pub use warden_policy_auth::exports::warden::policy::lifecycle::Guest as Lifecycle;
    pub use warden_policy_auth::warden::policy::host::{Level, log};
    pub use warden_policy_auth::warden::policy::types::{Header, Principal, Refusal, RequestInfo};
    #[doc(hidden)]
    pub use warden_policy_auth::*;
}

/// The sanitizer world.
pub mod sanitizer {
    pub use warden_policy_sanitizer::exports::warden::policy::lifecycle::Guest as Lifecycle;
    pub use warden_policy_sanitizer::exports::warden::policy::sanitizer::{
        ChatMessage, Guest, GuestOutputFilter, InferenceInput, InputKind, InputVerdict, Payload,
    };
    pub use warden_policy_sanitizer::warden::policy::host::{Level, log};
    pub use warden_policy_sanitizer::warden::policy::types::{Principal, Refusal};
    #[doc(hidden)]
    pub use warden_policy_sanitizer::*;
}

/// The metrics-policy world.
pub mod metrics {
    pub use warden_policy_metrics::exports::warden::policy::lifecycle::Guest as Lifecycle;
    pub use warden_policy_metrics::exports::warden::policy::metrics_policy::{
        Guest, Label, RequestSummary, Visibility,
    };
    pub use warden_policy_metrics::warden::policy::host::{Level, log};
    pub use warden_policy_metrics::warden::policy::types::Principal;
    #[doc(hidden)]
    pub use warden_policy_metrics::*;
}

#[doc(hidden)]
pub use warden_policy_auth::__export_auth_world;
#[doc(hidden)]
pub use warden_policy_metrics::__export_metrics_world;
#[doc(hidden)]
pub use warden_policy_sanitizer::__export_sanitizer_world;

mod helpers;
pub use helpers::*;

/// Parse the operator's configuration (a JSON object) into `T`, with the message every
/// plugin gives for a bad one.
pub fn parse_config<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| format!("invalid configuration: {e}"))
}

/// An authentication plugin: who sent a request.
pub trait Auth: Sized + 'static {
    /// The configuration, parsed once per instance.
    type Config: serde::de::DeserializeOwned;
    /// Build the plugin from its configuration; an `Err` refuses it (with that message).
    fn new(config: Self::Config) -> Result<Self, String>;
    /// A principal lets the request on (the host then checks the route's scope), a refusal
    /// answers it (normally 401).
    fn authenticate(&self, request: &auth::RequestInfo) -> Result<auth::Principal, auth::Refusal>;
}

/// A sanitizer: whether inference input may pass, and what output text the client sees.
pub trait Sanitizer: Sized + 'static {
    /// The configuration, parsed once per instance.
    type Config: serde::de::DeserializeOwned;
    /// The filter of one response's generated text.
    type Filter: OutputFilter;
    /// Build the plugin from its configuration; an `Err` refuses it.
    fn new(config: Self::Config) -> Result<Self, String>;
    /// Pass, rewrite (same shape) or refuse an input before the model sees it.
    fn check_input(
        &self,
        input: sanitizer::InferenceInput,
    ) -> Result<sanitizer::InputVerdict, sanitizer::Refusal>;
    /// A filter for one response of `kind`.
    fn output_filter(&self, kind: sanitizer::InputKind) -> Self::Filter;
}

/// The filter of one response's generated text, fed in order: what it returns is what the
/// client sees. It may hold text back (a secret split across pieces) until `finish`.
pub trait OutputFilter: 'static {
    /// The next piece of text; the text that may be released now (possibly empty).
    fn push(&mut self, chunk: &str) -> Result<String, sanitizer::Refusal>;
    /// The end: whatever was held back, as it may be released.
    fn finish(&mut self) -> Result<String, sanitizer::Refusal>;
}

/// A metrics policy: the labels a request is recorded under, and what a caller may read.
pub trait MetricsPolicy: Sized + 'static {
    /// The configuration, parsed once per instance.
    type Config: serde::de::DeserializeOwned;
    /// Build the plugin from its configuration; an `Err` refuses it.
    fn new(config: Self::Config) -> Result<Self, String>;
    /// Labels (`route`, `model`, `status_class`, `tenant`; each at most once).
    fn labels(&self, request: &metrics::RequestSummary) -> Vec<metrics::Label>;
    /// Which series `caller` may read from `/v1/metrics`.
    fn visible_series(&self, caller: &metrics::Principal) -> metrics::Visibility;
}

/// Export `$plugin` (an [`Auth`]) as the component's auth plugin.
#[macro_export]
macro_rules! export_auth {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __WardenAuth;

        ::std::thread_local! {
            static __WARDEN_PLUGIN: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                const { ::std::cell::RefCell::new(::std::option::Option::None) };
        }

        impl $crate::auth::Lifecycle for __WardenAuth {
            fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                let parsed = $crate::parse_config(&config)?;
                let plugin = <$plugin as $crate::Auth>::new(parsed)?;
                __WARDEN_PLUGIN.with(|p| *p.borrow_mut() = ::std::option::Option::Some(plugin));
                ::std::result::Result::Ok(())
            }
        }

        impl $crate::auth::Guest for __WardenAuth {
            fn authenticate(
                request: $crate::auth::RequestInfo,
            ) -> ::std::result::Result<$crate::auth::Principal, $crate::auth::Refusal> {
                __WARDEN_PLUGIN.with(|p| match &*p.borrow() {
                    ::std::option::Option::Some(plugin) => $crate::Auth::authenticate(plugin, &request),
                    ::std::option::Option::None => ::std::result::Result::Err($crate::unconfigured().into()),
                })
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__export_auth_world!(__WardenAuth with_types_in $crate::auth);
    };
}

/// Export `$plugin` (a [`Sanitizer`]) as the component's sanitizer.
#[macro_export]
macro_rules! export_sanitizer {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __WardenSanitizer;

        ::std::thread_local! {
            static __WARDEN_PLUGIN: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                const { ::std::cell::RefCell::new(::std::option::Option::None) };
        }

        impl $crate::sanitizer::Lifecycle for __WardenSanitizer {
            fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                let parsed = $crate::parse_config(&config)?;
                let plugin = <$plugin as $crate::Sanitizer>::new(parsed)?;
                __WARDEN_PLUGIN.with(|p| *p.borrow_mut() = ::std::option::Option::Some(plugin));
                ::std::result::Result::Ok(())
            }
        }

        #[doc(hidden)]
        pub struct __WardenFilter(
            ::std::cell::RefCell<::std::option::Option<<$plugin as $crate::Sanitizer>::Filter>>,
        );

        impl $crate::sanitizer::GuestOutputFilter for __WardenFilter {
            fn new(kind: $crate::sanitizer::InputKind) -> Self {
                Self(::std::cell::RefCell::new(__WARDEN_PLUGIN.with(|p| {
                    p.borrow()
                        .as_ref()
                        .map(|plugin| $crate::Sanitizer::output_filter(plugin, kind))
                })))
            }

            fn push(
                &self,
                chunk: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::sanitizer::Refusal> {
                match &mut *self.0.borrow_mut() {
                    ::std::option::Option::Some(f) => $crate::OutputFilter::push(f, &chunk),
                    ::std::option::Option::None => ::std::result::Result::Err($crate::unconfigured().into()),
                }
            }

            fn finish(
                &self,
            ) -> ::std::result::Result<::std::string::String, $crate::sanitizer::Refusal> {
                match &mut *self.0.borrow_mut() {
                    ::std::option::Option::Some(f) => $crate::OutputFilter::finish(f),
                    ::std::option::Option::None => ::std::result::Result::Err($crate::unconfigured().into()),
                }
            }
        }

        impl $crate::sanitizer::Guest for __WardenSanitizer {
            type OutputFilter = __WardenFilter;

            fn check_input(
                input: $crate::sanitizer::InferenceInput,
            ) -> ::std::result::Result<$crate::sanitizer::InputVerdict, $crate::sanitizer::Refusal> {
                __WARDEN_PLUGIN.with(|p| match &*p.borrow() {
                    ::std::option::Option::Some(plugin) => $crate::Sanitizer::check_input(plugin, input),
                    ::std::option::Option::None => ::std::result::Result::Err($crate::unconfigured().into()),
                })
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__export_sanitizer_world!(__WardenSanitizer with_types_in $crate::sanitizer);
    };
}

/// Export `$plugin` (a [`MetricsPolicy`]) as the component's metrics policy.
#[macro_export]
macro_rules! export_metrics_policy {
    ($plugin:ty) => {
        #[doc(hidden)]
        pub struct __WardenMetrics;

        ::std::thread_local! {
            static __WARDEN_PLUGIN: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                const { ::std::cell::RefCell::new(::std::option::Option::None) };
        }

        impl $crate::metrics::Lifecycle for __WardenMetrics {
            fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                let parsed = $crate::parse_config(&config)?;
                let plugin = <$plugin as $crate::MetricsPolicy>::new(parsed)?;
                __WARDEN_PLUGIN.with(|p| *p.borrow_mut() = ::std::option::Option::Some(plugin));
                ::std::result::Result::Ok(())
            }
        }

        impl $crate::metrics::Guest for __WardenMetrics {
            fn labels(request: $crate::metrics::RequestSummary) -> ::std::vec::Vec<$crate::metrics::Label> {
                __WARDEN_PLUGIN.with(|p| match &*p.borrow() {
                    ::std::option::Option::Some(plugin) => $crate::MetricsPolicy::labels(plugin, &request),
                    ::std::option::Option::None => ::std::vec::Vec::new(),
                })
            }

            fn visible_series(caller: $crate::metrics::Principal) -> $crate::metrics::Visibility {
                __WARDEN_PLUGIN.with(|p| match &*p.borrow() {
                    ::std::option::Option::Some(plugin) => {
                        $crate::MetricsPolicy::visible_series(plugin, &caller)
                    }
                    ::std::option::Option::None => $crate::metrics::Visibility::None,
                })
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::__export_metrics_world!(__WardenMetrics with_types_in $crate::metrics);
    };
}
