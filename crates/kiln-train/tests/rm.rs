//! The reward is read at each response's last real token, whatever the padding around it.

use kiln_model::{Activations, Arch, Model, ModelConfig};
use kiln_train::rm::score_rows;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn reward_position_is_correct_under_padding() {
    for arch in [Arch::Decoder, Arch::Encoder] {
        let cfg = ModelConfig {
            vocab_size: 40,
            n_ctx: 16,
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            arch,
            score_head: true,
            ..ModelConfig::default()
        };
        let mut model = Model::new(cfg.clone(), 5);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for x in model.params.iter_mut() {
            *x += rng.gen_range(-0.1..0.1);
        }
        let seqs: Vec<Vec<u32>> = vec![
            vec![9, 10, 11, 5],
            vec![12, 13, 5],
            vec![14, 15, 16, 17, 18, 19, 5],
        ];
        // Alone, each sequence fills its row exactly: no padding at all.
        let alone: Vec<f32> = seqs
            .iter()
            .map(|s| {
                let t = s.len() + (arch == Arch::Encoder) as usize;
                score_rows(
                    &model,
                    &mut Activations::new(&cfg, 1, t, false),
                    std::slice::from_ref(s),
                )[0]
            })
            .collect();
        // Batched: packed several to a row (segments keep them apart, positions restart), with
        // padding after them and spare rows; in rows of 12 and of 16 tokens the packing differs.
        for (rows, t) in [(5, 12), (3, 16), (3, 8)] {
            let batched = score_rows(&model, &mut Activations::new(&cfg, rows, t, false), &seqs);
            for (a, b) in alone.iter().zip(&batched) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{arch:?} {rows}x{t}: packed score {b} vs alone {a}"
                );
            }
        }
        // Padding tokens after the end never change the score: it is not read at the last position.
        let mut padded_seq = seqs[1].clone();
        padded_seq.extend([1, 1, 1]);
        let wrong = score_rows(
            &model,
            &mut Activations::new(&cfg, 1, 6, false),
            &[padded_seq],
        )[0];
        if arch == Arch::Decoder {
            assert!(
                (wrong - alone[1]).abs() > 1e-4,
                "a score read at a padding position would go unnoticed"
            );
        }
    }
}
