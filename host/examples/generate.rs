//! Greedy generation from the command line: `cargo run --release --example generate -- MODEL.gguf "prompt"`.
use std::time::Instant;
use warden::engine::{
    GenerateConfig, GenerateEvent, GenerateRequest, SamplingParams, TemplateMessage, TextModel,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("model path");
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());
    let model =
        TextModel::load("m", std::path::Path::new(&path), GenerateConfig::default()).expect("load");
    let text = model
        .template
        .as_ref()
        .expect("template")
        .render(&[TemplateMessage {
            role: "user".into(),
            content: prompt,
        }])
        .expect("render");
    let ids = model
        .handle
        .tokenizer()
        .encode(&text, true, true)
        .expect("encode");
    println!("prompt ids: {ids:?}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    rt.block_on(async {
        let t = Instant::now();
        let mut rx = model
            .handle
            .submit(GenerateRequest {
                prompt: ids,
                max_tokens: 64,
                sampling: SamplingParams {
                    temperature: 0.0,
                    ..Default::default()
                },
                stop: vec![],
                span: tracing::Span::none(),
                cache_scope: String::new(),
            })
            .expect("submit");
        while let Some(e) = rx.recv().await {
            match e {
                GenerateEvent::Started => {}
                GenerateEvent::Delta(d) => print!("{d}"),
                other => println!("\n{other:?} in {:?}", t.elapsed()),
            }
        }
    });
}
