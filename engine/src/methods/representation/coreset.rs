//! Greedy k-center coreset selection (PatchCore's "coreset subsampling"), exact and fast.
//!
//! The greedy rule: start from a random point; repeatedly add the point farthest from every centre chosen so
//! far. Done plainly, each of the ~78,000 steps of a 10 % coreset of MTD rereads the whole 779,264-point bank.
//! Here the points live in a ball tree (each node: centroid, radius, and the largest current distance-to-centre
//! of its points). When a new centre `c` arrives, a node whose every point is provably no closer to `c` than to
//! its current centre — `|c − centroid| − radius ≥ max distance in node` (triangle inequality) — is skipped
//! whole; late in the selection, when distances are small, almost the whole tree is skipped. The farthest point
//! is found by descending along the larger per-node maximum. The result is the same selection as the plain
//! algorithm (tested), not an approximation.
//!
//! As in the paper, distances are computed on a random projection of the features (Johnson–Lindenstrauss).

use crate::progress::{check_cancelled, Cancelled, Progress};
use crate::rng::SplitMix64;
use rayon::prelude::*;

const LEAF_SIZE: usize = 24;
/// Bounds are compared with this slack so that rounding can only cause extra work, never a wrong skip.
const BOUND_SLACK: f32 = 1e-4;

#[inline]
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let (rest_a, rest_b) = (chunks_a.remainder(), chunks_b.remainder());
    for (x, y) in chunks_a.zip(chunks_b) {
        for i in 0..8 {
            let d = x[i] - y[i];
            lanes[i] += d * d;
        }
    }
    let mut total = lanes.iter().sum::<f32>();
    for (x, y) in rest_a.iter().zip(rest_b) {
        total += (x - y) * (x - y);
    }
    total
}

/// Gaussian random projection of `rows × dim` points to `out_dim` dimensions, scaled to keep distances.
pub fn random_projection(points: &[f32], dim: usize, out_dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed ^ 0x5eed_9e37);
    let scale = 1.0 / (out_dim as f32).sqrt();
    // Stored transposed (out_dim rows of `dim`) so each output is a dot product of contiguous slices.
    let matrix: Vec<f32> = (0..dim * out_dim).map(|_| rng.normal() * scale).collect();
    let mut out = vec![0f32; points.len() / dim * out_dim];
    out.par_chunks_mut(out_dim).zip(points.par_chunks(dim)).for_each(|(projected, point)| {
        for (o, row) in projected.iter_mut().zip(matrix.chunks_exact(dim)) {
            *o = row.iter().zip(point).map(|(a, b)| a * b).sum();
        }
    });
    out
}

/// The plain greedy algorithm, kept as the reference the tree version is tested against.
pub fn greedy_coreset_plain(points: &[f32], dim: usize, count: usize, seed: u64) -> Vec<usize> {
    let n = points.len() / dim;
    let count = count.min(n);
    if count == 0 {
        return Vec::new();
    }
    let mut min_distance = vec![f32::INFINITY; n];
    let mut selected = vec![SplitMix64::new(seed).below(n)];
    while selected.len() <= count {
        let centre = &points[selected[selected.len() - 1] * dim..][..dim];
        for (i, d) in min_distance.iter_mut().enumerate() {
            *d = d.min(squared_distance(centre, &points[i * dim..(i + 1) * dim]));
        }
        if selected.len() == count {
            break;
        }
        let farthest = (0..n).fold(0, |best, i| if min_distance[i] > min_distance[best] { i } else { best });
        selected.push(farthest);
    }
    selected
}

struct Node {
    start: usize,
    end: usize,
    /// Children, or `None` for a leaf.
    children: Option<(usize, usize)>,
    radius: f32,
    /// Largest squared distance of a point in this node to its nearest chosen centre.
    max_min_distance: f32,
}

struct BallTree {
    dim: usize,
    /// Points in tree order.
    points: Vec<f32>,
    /// `original[i]`: the caller's index of tree-order point `i`.
    original: Vec<usize>,
    nodes: Vec<Node>,
    centroids: Vec<f32>,
    min_distance: Vec<f32>,
}

impl BallTree {
    fn build(points: &[f32], dim: usize) -> Self {
        let n = points.len() / dim;
        let mut order: Vec<usize> = (0..n).collect();
        let mut tree = BallTree {
            dim,
            points: Vec::new(),
            original: Vec::new(),
            nodes: Vec::new(),
            centroids: Vec::new(),
            min_distance: vec![f32::INFINITY; n],
        };
        tree.build_node(points, &mut order, 0, n);
        tree.points = order.iter().flat_map(|&i| points[i * dim..(i + 1) * dim].iter().copied()).collect();
        tree.original = order;
        tree
    }

    fn point<'a>(points: &'a [f32], dim: usize, i: usize) -> &'a [f32] {
        &points[i * dim..(i + 1) * dim]
    }

    /// Builds the node for `order[start..end]` and returns its index.
    fn build_node(&mut self, points: &[f32], order: &mut [usize], start: usize, end: usize) -> usize {
        let dim = self.dim;
        let members = &order[start..end];
        let mut centroid = vec![0f32; dim];
        for &i in members {
            for (c, v) in centroid.iter_mut().zip(Self::point(points, dim, i)) {
                *c += v;
            }
        }
        centroid.iter_mut().for_each(|c| *c /= members.len() as f32);
        let (farthest_from_centroid, radius_sq) = members
            .iter()
            .map(|&i| (i, squared_distance(&centroid, Self::point(points, dim, i))))
            .fold((members[0], 0f32), |best, x| if x.1 > best.1 { x } else { best });
        let index = self.nodes.len();
        self.nodes.push(Node {
            start,
            end,
            children: None,
            radius: radius_sq.sqrt() * (1.0 + BOUND_SLACK) + BOUND_SLACK,
            max_min_distance: f32::INFINITY,
        });
        self.centroids.extend_from_slice(&centroid);
        if end - start <= LEAF_SIZE || radius_sq == 0.0 {
            return index;
        }
        // Split along the line between two far-apart points, at the median projection.
        let a = Self::point(points, dim, farthest_from_centroid).to_vec();
        let b_index = members
            .iter()
            .map(|&i| (i, squared_distance(&a, Self::point(points, dim, i))))
            .fold((members[0], 0f32), |best, x| if x.1 > best.1 { x } else { best })
            .0;
        let direction: Vec<f32> = Self::point(points, dim, b_index).iter().zip(&a).map(|(b, a)| b - a).collect();
        let project = |i: usize| -> f32 { Self::point(points, dim, i).iter().zip(&direction).map(|(x, d)| x * d).sum() };
        let mut keyed: Vec<(f32, usize)> = order[start..end].iter().map(|&i| (project(i), i)).collect();
        let middle = keyed.len() / 2;
        keyed.select_nth_unstable_by(middle, |x, y| x.0.total_cmp(&y.0));
        for (slot, (_, i)) in order[start..end].iter_mut().zip(keyed) {
            *slot = i;
        }
        let left = self.build_node(points, order, start, start + middle);
        let right = self.build_node(points, order, start + middle, end);
        self.nodes[index].children = Some((left, right));
        index
    }

    fn centroid(&self, node: usize) -> &[f32] {
        &self.centroids[node * self.dim..(node + 1) * self.dim]
    }

    /// Lowers every point's distance-to-nearest-centre for the new centre `q`; returns the node's new maximum.
    fn add_centre(&mut self, node: usize, q: &[f32]) -> f32 {
        let bound = self.nodes[node].max_min_distance;
        let to_centroid = squared_distance(q, self.centroid(node)).sqrt();
        let gap = to_centroid - self.nodes[node].radius;
        if gap > 0.0 && gap * gap * (1.0 - BOUND_SLACK) >= bound {
            return bound;
        }
        let new_max = match self.nodes[node].children {
            Some((left, right)) => self.add_centre(left, q).max(self.add_centre(right, q)),
            None => {
                let (start, end, dim) = (self.nodes[node].start, self.nodes[node].end, self.dim);
                let mut max = 0f32;
                for i in start..end {
                    let d = squared_distance(q, &self.points[i * dim..(i + 1) * dim]);
                    let m = &mut self.min_distance[i];
                    if d < *m {
                        *m = d;
                    }
                    max = max.max(*m);
                }
                max
            }
        };
        self.nodes[node].max_min_distance = new_max;
        new_max
    }

    /// Tree-order index of the point farthest from all centres.
    fn farthest(&self) -> usize {
        let mut node = 0;
        while let Some((left, right)) = self.nodes[node].children {
            node = if self.nodes[left].max_min_distance >= self.nodes[right].max_min_distance { left } else { right };
        }
        let Node { start, end, .. } = self.nodes[node];
        (start..end).fold(start, |best, i| if self.min_distance[i] > self.min_distance[best] { i } else { best })
    }
}

/// Exact greedy k-center selection of `count` of the `points` (rows of `dim`), accelerated by a ball tree.
/// Returns the caller's indices in selection order.
pub fn greedy_coreset(
    points: &[f32],
    dim: usize,
    count: usize,
    seed: u64,
    progress: &dyn Progress,
) -> Result<Vec<usize>, Cancelled> {
    let n = points.len() / dim;
    let count = count.min(n);
    if count == 0 {
        return Ok(Vec::new());
    }
    let mut tree = BallTree::build(points, dim);
    let first = SplitMix64::new(seed).below(n);
    let mut tree_index = tree.original.iter().position(|&i| i == first).expect("every point is in the tree");
    let mut selected = Vec::with_capacity(count);
    progress.begin("coreset", count as u64);
    loop {
        selected.push(tree.original[tree_index]);
        let centre = tree.points[tree_index * dim..(tree_index + 1) * dim].to_vec();
        tree.add_centre(0, &centre);
        if selected.len() == count {
            break;
        }
        tree_index = tree.farthest();
        if selected.len() % 1024 == 0 {
            progress.advance(1024);
            check_cancelled(progress)?;
        }
    }
    progress.advance((count % 1024) as u64);
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    fn clustered_points(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        let centres: Vec<f32> = (0..8 * dim).map(|_| rng.normal() * 4.0).collect();
        (0..n)
            .flat_map(|i| {
                let c = i % 8;
                (0..dim).map(|d| centres[c * dim + d] + rng.normal()).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn tree_selection_equals_plain_greedy() {
        for (n, dim, count, seed) in [(3000, 16, 300, 1), (2000, 128, 200, 2), (500, 3, 499, 3), (100, 5, 1, 4)] {
            let points = clustered_points(n, dim, seed);
            let plain = greedy_coreset_plain(&points, dim, count, seed);
            let fast = greedy_coreset(&points, dim, count, seed, &NoProgress).unwrap();
            assert_eq!(plain, fast, "n={n} dim={dim} count={count}");
        }
    }

    #[test]
    fn duplicates_and_tiny_inputs() {
        let points = vec![1.0f32; 64 * 4];
        let picked = greedy_coreset(&points, 4, 10, 0, &NoProgress).unwrap();
        assert_eq!(picked.len(), 10);
        assert!(greedy_coreset(&points, 4, 0, 0, &NoProgress).unwrap().is_empty());
    }

    #[test]
    fn projection_roughly_keeps_distances() {
        let points = clustered_points(200, 152, 5);
        let projected = random_projection(&points, 152, 128, 5);
        let original = squared_distance(&points[..152], &points[152 * 7..152 * 8]).sqrt();
        let reduced = squared_distance(&projected[..128], &projected[128 * 7..128 * 8]).sqrt();
        assert!((reduced / original - 1.0).abs() < 0.3, "{original} vs {reduced}");
    }
}
