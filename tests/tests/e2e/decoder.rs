//! Warden's llama decoder (shared weights, per-sequence KV cache, its own SIMD Q4_1 kernel)
//! gives the same logits as candle-transformers' reference `quantized_llama`, bit for bit.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use warden::engine::llama::{Weights, argmax};

#[test]
fn logits_are_bit_identical_to_candles_quantized_llama() {
    let path = warden_tests::models_dir().join(warden::config::DEFAULT_TEXT_MODEL);
    let open = || {
        let mut file = std::fs::File::open(&path).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        (content, file)
    };
    let (content, mut file) = open();
    let ours = Weights::from_gguf(&content, &mut file, &Device::Cpu).unwrap();
    let (content, mut file) = open();
    let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();

    // "<|im_start|>user\nThe capital of France is" then 12 greedy steps, one token at a time.
    let prompt: Vec<u32> = vec![1, 4093, 198, 504, 3575, 282, 4649, 314];
    let mut cache = ours.new_cache();
    let mut logits = ours.forward(&prompt, &mut cache).unwrap();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut expected: Vec<f32> = reference
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (step, position) in (prompt.len()..).take(12).enumerate() {
        assert_eq!(logits, expected, "logits differ at step {step}");
        let next = argmax(&logits);
        logits = ours.forward(&[next], &mut cache).unwrap();
        let input = Tensor::new(&[next], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        expected = reference
            .forward(&input, position)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
    }
}
