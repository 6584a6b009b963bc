//! The `warden:policy/sanitizer-plugin` world's generated bindings, for `warden-policy`: a plugin
//! depends on `warden-policy`, never on this crate. One crate per world, so that the export
//! glue of one world never meets another's.
// The wit-bindgen glue expands to `unsafe` ABI code.
#![allow(unsafe_code)]
#![allow(missing_docs)]

wit_bindgen::generate!({
    path: "../rust/wit/0.1.0",
    world: "warden:policy/sanitizer-plugin@0.1.0",
    pub_export_macro: true,
    export_macro_name: "__export_sanitizer_world",
    default_bindings_module: "warden_policy::sanitizer",
});
