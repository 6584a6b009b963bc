//! The `warden:policy/metrics-policy-plugin` world's generated bindings, for `warden-policy`: a plugin
//! depends on `warden-policy`, never on this crate. One crate per world, so that the export
//! glue of one world never meets another's.
// The wit-bindgen glue expands to `unsafe` ABI code.
#![allow(unsafe_code)]
#![allow(missing_docs)]

wit_bindgen::generate!({
    path: "../rust/wit/0.1.0",
    world: "warden:policy/metrics-policy-plugin@0.1.0",
    pub_export_macro: true,
    export_macro_name: "__export_metrics_world",
    default_bindings_module: "warden_policy::metrics",
});
