//! Choosing among known names: every candidate's token sequence is merged into a trie, scored in
//! one forward pass as a token tree, and ranked by its exact probability under the model.

/// Candidate token sequences merged by common prefix, as the token tree the model scores.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTrie {
    /// One token per node.
    pub tokens: Vec<u32>,
    /// Per node: its parent node, or −1 for a child of the root (the prompt's last position).
    pub parents: Vec<i32>,
    /// Per candidate: its nodes from the root down.
    pub paths: Vec<Vec<usize>>,
}

impl TokenTrie {
    /// Merge `candidates` (each a non-empty token sequence; none a prefix of another — end each
    /// with a terminator token so that holds).
    pub fn new(candidates: &[Vec<u32>]) -> Self {
        let mut trie = Self { tokens: Vec::new(), parents: Vec::new(), paths: Vec::new() };
        for cand in candidates {
            let mut parent = -1i32;
            let mut path = Vec::with_capacity(cand.len());
            for &tok in cand {
                let existing = (0..trie.tokens.len()).find(|&n| trie.parents[n] == parent && trie.tokens[n] == tok);
                let node = existing.unwrap_or_else(|| {
                    trie.tokens.push(tok);
                    trie.parents.push(parent);
                    trie.tokens.len() - 1
                });
                path.push(node);
                parent = node as i32;
            }
            trie.paths.push(path);
        }
        trie
    }

    /// Log-probability of each candidate: the sum over its tokens of the log-softmax, at the
    /// token's parent (or of `root_logits` for the first token), of that token. `node_logits`
    /// holds `n_vocab` logits per node.
    pub fn log_probs(&self, root_logits: &[f32], node_logits: &[f32], n_vocab: usize) -> Vec<f64> {
        let log_softmax_at = |logits: &[f32], tok: u32| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
            logits[tok as usize] as f64 - max - sum.ln()
        };
        self.paths
            .iter()
            .map(|path| {
                path.iter()
                    .map(|&n| {
                        let at = match self.parents[n] {
                            -1 => root_logits,
                            p => &node_logits[p as usize * n_vocab..(p as usize + 1) * n_vocab],
                        };
                        log_softmax_at(at, self.tokens[n])
                    })
                    .sum()
            })
            .collect()
    }
}

/// Probabilities from log-probabilities, normalised over the candidates (the choice is
/// constrained to them).
pub fn normalise(log_probs: &[f64]) -> Vec<f64> {
    let max = log_probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = log_probs.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trie_shares_prefixes_and_keeps_paths() {
        let t = TokenTrie::new(&[vec![5, 6, 9], vec![5, 7, 9], vec![5, 6, 8, 9], vec![4, 9]]);
        assert_eq!(t.tokens, [5, 6, 9, 7, 9, 8, 9, 4, 9]);
        assert_eq!(t.parents, [-1, 0, 1, 0, 3, 1, 5, -1, 7]);
        assert_eq!(t.paths, [vec![0, 1, 2], vec![0, 3, 4], vec![0, 1, 5, 6], vec![7, 8]]);
    }

    #[test]
    fn log_probs_sum_along_each_path() {
        // Vocabulary of 3; root prefers token 1; node 0 (token 1) prefers token 2.
        let root = [0.0f32, 2.0, 0.0];
        let nodes = [0.0f32, 0.0, 3.0, /* node 1 */ 0.0, 0.0, 0.0, /* node 2 */ 0.0, 0.0, 0.0];
        let t = TokenTrie::new(&[vec![1, 2], vec![1, 0], vec![0]]);
        let lp = t.log_probs(&root, &nodes, 3);
        let ls = |l: &[f32], i: usize| {
            let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
            (l[i] as f64).exp().ln() - z.ln()
        };
        let want = [ls(&root, 1) + ls(&nodes[..3], 2), ls(&root, 1) + ls(&nodes[..3], 0), ls(&root, 0)];
        for (a, b) in lp.iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{lp:?} vs {want:?}");
        }
        let p = normalise(&lp);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12 && p[0] > p[1] && p[0] > p[2]);
    }
}
