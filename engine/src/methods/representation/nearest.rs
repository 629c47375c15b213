//! Nearest memory-bank entry of many query rows on the CPU: the exhaustive search, and an inverted-file index
//! that searches a few lists of the bank with the same fused kernel.
//!
//! PatchCore scores a 256-pixel image with 1,024 patch rows against its bank (~78,000 rows of 152 channels for
//! MTD at 10 %): 24 GFLOP searched exhaustively, about 4 images/s on two cores. The inverted index clusters the
//! bank with k-means into `lists` lists; a query searches only the `probes` lists whose centroids are nearest and
//! takes the exact distance to every member it sees (exact re-ranking), so a patch's distance is exact whenever
//! its true nearest entry lies in a probed list, and otherwise slightly larger. Queries are grouped by list so
//! that each list is one matrix product, as in the exhaustive search. PatchCore then makes each image's score
//! exact (see `patchcore.rs`), so only the map can differ from the exhaustive search's.
//!
//! Not an HNSW crate (hnsw_rs, instant-distance): they search query by query with scalar distances, while
//! PatchCore always has a thousand queries at once, which a list-by-list matrix product serves better.

use crate::rng::SplitMix64;
use rayon::prelude::*;

/// Below this many bank rows the exhaustive search is fast enough to be the default.
pub const INDEX_MIN_BANK: usize = 16384;

/// Lists of the inverted index per √(bank rows) by default: ∝ √rows balances the centroid search against the
/// lists'.
pub const LISTS_PER_ROOT: f64 = 4.0;

/// Lists for a bank of `rows`: `setting` when set (at most one per row), else `LISTS_PER_ROOT`·√rows.
pub fn index_lists(rows: usize, setting: usize) -> usize {
    if setting > 0 {
        return setting.min(rows);
    }
    ((rows as f64).sqrt() * LISTS_PER_ROOT).round().max(1.0) as usize
}

/// Queries per block of the fused search: the block's `queries × bank` products stay in cache.
const QUERY_BLOCK: usize = 64;

/// Row-major `queries (q × c)` times `points (m × c)ᵀ` into `q × m`.
fn dot_products(queries: &[f32], points: &[f32], channels: usize) -> Vec<f32> {
    let (q, m) = (queries.len() / channels, points.len() / channels);
    let mut dots = vec![0f32; q * m];
    if q == 0 || m == 0 {
        return dots;
    }
    // SAFETY: row-major q×c times (m×c)ᵀ into q×m; every buffer is sized accordingly above.
    unsafe {
        gemm::gemm(
            q,
            m,
            channels,
            dots.as_mut_ptr(),
            1,
            m as isize,
            false,
            queries.as_ptr(),
            1,
            channels as isize,
            points.as_ptr(),
            channels as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    dots
}

fn squared_norms(rows: &[f32], channels: usize) -> Vec<f32> {
    rows.chunks_exact(channels).map(|row| row.iter().map(|v| v * v).sum()).collect()
}

/// Squared distance to, and index of, the nearest of `points` for every query row; blocks run in parallel.
/// `point_norms` are the points' squared norms.
pub fn nearest_squared(queries: &[f32], points: &[f32], point_norms: &[f32], channels: usize) -> (Vec<f32>, Vec<u32>) {
    let n = queries.len() / channels;
    let mut distances = vec![f32::INFINITY; n];
    let mut indices = vec![0u32; n];
    if point_norms.is_empty() {
        return (distances, indices);
    }
    distances.par_chunks_mut(QUERY_BLOCK).zip(indices.par_chunks_mut(QUERY_BLOCK)).enumerate().for_each(
        |(block, (block_distances, block_indices))| {
            let start = block * QUERY_BLOCK * channels;
            let block_queries = &queries[start..start + block_distances.len() * channels];
            let dots = dot_products(block_queries, points, channels);
            for (i, row_dots) in dots.chunks_exact(point_norms.len()).enumerate() {
                // min over j of |p_j|² − 2 q·p_j; |q|² is added once after.
                let (mut best, mut best_index) = (f32::INFINITY, 0u32);
                for (j, (&dot, &norm)) in row_dots.iter().zip(point_norms).enumerate() {
                    let partial = norm - 2.0 * dot;
                    if partial < best {
                        best = partial;
                        best_index = j as u32;
                    }
                }
                let query = &block_queries[i * channels..(i + 1) * channels];
                let query_norm: f32 = query.iter().map(|v| v * v).sum();
                block_distances[i] = (best + query_norm).max(0.0);
                block_indices[i] = best_index;
            }
        },
    );
    (distances, indices)
}

/// The `k` nearest of `points` for every query row (unordered), `n × k` indices.
fn nearest_k(queries: &[f32], points: &[f32], point_norms: &[f32], channels: usize, k: usize) -> Vec<u32> {
    let m = point_norms.len();
    let k = k.min(m);
    let n = queries.len() / channels;
    let mut chosen = vec![0u32; n * k];
    if k == 0 {
        return chosen;
    }
    chosen.par_chunks_mut(QUERY_BLOCK * k).enumerate().for_each(|(block, block_chosen)| {
        let start = block * QUERY_BLOCK * channels;
        let block_queries = &queries[start..start + block_chosen.len() / k * channels];
        let dots = dot_products(block_queries, points, channels);
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for (row_dots, row_chosen) in dots.chunks_exact(m).zip(block_chosen.chunks_exact_mut(k)) {
            // A running top-k, kept sorted: k is a handful, so most points fail one comparison.
            best.clear();
            for (j, (&dot, &norm)) in row_dots.iter().zip(point_norms).enumerate() {
                let partial = norm - 2.0 * dot;
                if best.len() < k || partial < best[k - 1].0 {
                    let at = best.partition_point(|&(d, _)| d <= partial);
                    best.insert(at, (partial, j as u32));
                    best.truncate(k);
                }
            }
            for (out, &(_, j)) in row_chosen.iter_mut().zip(&best) {
                *out = j;
            }
        }
    });
    chosen
}

/// `|p|² − 2 q·p` from one query to every point (its squared distance less `|q|²`), the points split among
/// threads: one query's search is bound by reading the bank, which two cores do faster than one.
fn partial_distances_to_all(query: &[f32], points: &[f32], point_norms: &[f32], channels: usize) -> Vec<f32> {
    const POINTS_PER_TASK: usize = 8192;
    let mut out = vec![0f32; point_norms.len()];
    out.par_chunks_mut(POINTS_PER_TASK).enumerate().for_each(|(task, out)| {
        let start = task * POINTS_PER_TASK;
        let dots = dot_products(query, &points[start * channels..(start + out.len()) * channels], channels);
        for ((o, dot), norm) in out.iter_mut().zip(dots).zip(&point_norms[start..]) {
            *o = norm - 2.0 * dot;
        }
    });
    out
}

/// The bank regrouped into k-means lists, each list's rows contiguous.
pub struct InvertedIndex {
    channels: usize,
    /// `lists × channels` list centres and their squared norms.
    centroids: Vec<f32>,
    centroid_norms: Vec<f32>,
    /// Bank rows ordered list by list, their squared norms and their index in the bank.
    members: Vec<f32>,
    member_norms: Vec<f32>,
    member_ids: Vec<u32>,
    /// List `l` holds members `offsets[l]..offsets[l + 1]`.
    offsets: Vec<usize>,
    /// The member position of each bank row (the inverse of `member_ids`).
    positions: Vec<u32>,
}

/// k-means rounds when building an index: enough for lists that probe well, not for convergence.
const KMEANS_ROUNDS: usize = 10;
/// Training rows per list for k-means (FAISS samples 39–256 per centroid).
const KMEANS_ROWS_PER_LIST: usize = 64;

impl InvertedIndex {
    /// Clusters `bank` (rows of `channels`) into `lists` lists with seeded k-means on a sample of the bank.
    pub fn build(bank: &[f32], channels: usize, lists: usize, seed: u64) -> Self {
        let rows = bank.len() / channels;
        let lists = lists.clamp(1, rows.max(1));
        let mut rng = SplitMix64::new(seed ^ 0x1f5_1157);
        let sample_len = (lists * KMEANS_ROWS_PER_LIST).min(rows);
        let sample_rows = sample_indices(rows, sample_len, &mut rng);
        let sample: Vec<f32> =
            sample_rows.iter().flat_map(|&i| bank[i * channels..(i + 1) * channels].iter().copied()).collect();
        // The first `lists` sample rows (a random choice) start the centres.
        let mut centroids = sample[..lists * channels].to_vec();
        for _ in 0..KMEANS_ROUNDS {
            let (_, assigned) = nearest_squared(&sample, &centroids, &squared_norms(&centroids, channels), channels);
            let mut sums = vec![0f64; lists * channels];
            let mut counts = vec![0usize; lists];
            for (row, &list) in sample.chunks_exact(channels).zip(&assigned) {
                counts[list as usize] += 1;
                for (sum, &value) in sums[list as usize * channels..].iter_mut().zip(row) {
                    *sum += value as f64;
                }
            }
            for (list, &count) in counts.iter().enumerate() {
                // An empty list keeps its centre (it may win rows again next round).
                if count > 0 {
                    for c in 0..channels {
                        centroids[list * channels + c] = (sums[list * channels + c] / count as f64) as f32;
                    }
                }
            }
        }
        let (_, assigned) = nearest_squared(bank, &centroids, &squared_norms(&centroids, channels), channels);
        let mut offsets = vec![0usize; lists + 1];
        for &list in &assigned {
            offsets[list as usize + 1] += 1;
        }
        for l in 0..lists {
            offsets[l + 1] += offsets[l];
        }
        let mut next = offsets.clone();
        let mut member_ids = vec![0u32; rows];
        for (row, &list) in assigned.iter().enumerate() {
            member_ids[next[list as usize]] = row as u32;
            next[list as usize] += 1;
        }
        Self::from_lists(bank, channels, centroids, member_ids, offsets)
    }

    /// The whole bank as one list: searching it is the exhaustive search.
    pub fn single_list(bank: &[f32], channels: usize) -> Self {
        let rows = bank.len() / channels;
        let centroid = (0..channels).map(|c| bank.iter().skip(c).step_by(channels).sum::<f32>() / rows.max(1) as f32);
        Self::from_lists(bank, channels, centroid.collect(), (0..rows as u32).collect(), vec![0, rows])
    }

    fn from_lists(
        bank: &[f32],
        channels: usize,
        centroids: Vec<f32>,
        member_ids: Vec<u32>,
        offsets: Vec<usize>,
    ) -> Self {
        let members: Vec<f32> = member_ids
            .iter()
            .flat_map(|&i| bank[i as usize * channels..(i as usize + 1) * channels].iter().copied())
            .collect();
        let mut positions = vec![0u32; member_ids.len()];
        for (position, &id) in member_ids.iter().enumerate() {
            positions[id as usize] = position as u32;
        }
        Self {
            channels,
            centroid_norms: squared_norms(&centroids, channels),
            centroids,
            member_norms: squared_norms(&members, channels),
            members,
            member_ids,
            offsets,
            positions,
        }
    }

    /// Squared distances from one row to every bank row, in member order (see [`Self::member_id`]).
    pub fn squared_distances_to_members(&self, query: &[f32]) -> Vec<f32> {
        let query_norm: f32 = query.iter().map(|v| v * v).sum();
        let mut distances = partial_distances_to_all(query, &self.members, &self.member_norms, self.channels);
        distances.iter_mut().for_each(|d| *d = (*d + query_norm).max(0.0));
        distances
    }

    /// The bank index of the member at `position`.
    pub fn member_id(&self, position: usize) -> u32 {
        self.member_ids[position]
    }

    /// The member position of bank row `id`.
    pub fn position_of(&self, id: u32) -> usize {
        self.positions[id as usize] as usize
    }

    pub fn member_row(&self, position: usize) -> &[f32] {
        &self.members[position * self.channels..(position + 1) * self.channels]
    }

    pub fn lists(&self) -> usize {
        self.centroid_norms.len()
    }

    /// Squared distance to, and bank index of, the nearest member among each query's `probes` nearest lists.
    pub fn nearest_squared(&self, queries: &[f32], probes: usize) -> (Vec<f32>, Vec<u32>) {
        let c = self.channels;
        let n = queries.len() / c;
        let probes = probes.clamp(1, self.lists());
        let probed = nearest_k(queries, &self.centroids, &self.centroid_norms, c, probes);
        let mut queries_of_list: Vec<Vec<u32>> = vec![Vec::new(); self.lists()];
        for (query, lists) in probed.chunks_exact(probes).enumerate() {
            for &list in lists {
                queries_of_list[list as usize].push(query as u32);
            }
        }
        // Each list: its queries gathered into one block, one product against its members.
        let found: Vec<(u32, f32, u32)> = queries_of_list
            .par_iter()
            .enumerate()
            .filter(|(list, asking)| !asking.is_empty() && self.offsets[list + 1] > self.offsets[*list])
            .flat_map_iter(|(list, asking)| {
                let (start, end) = (self.offsets[list], self.offsets[list + 1]);
                let gathered: Vec<f32> = asking
                    .iter()
                    .flat_map(|&q| queries[q as usize * c..(q as usize + 1) * c].iter().copied())
                    .collect();
                let (distances, local) =
                    nearest_squared(&gathered, &self.members[start * c..end * c], &self.member_norms[start..end], c);
                asking
                    .iter()
                    .zip(distances)
                    .zip(local)
                    .map(move |((&q, d), i)| (q, d, self.member_ids[start + i as usize]))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut distances = vec![f32::INFINITY; n];
        let mut indices = vec![0u32; n];
        for (query, distance, id) in found {
            let q = query as usize;
            // Ties go to the lower bank index, as in the exhaustive search.
            if distance < distances[q] || (distance == distances[q] && id < indices[q]) {
                distances[q] = distance;
                indices[q] = id;
            }
        }
        (distances, indices)
    }
}

/// `count` distinct indices below `rows`, in random order (a partial Fisher–Yates shuffle).
fn sample_indices(rows: usize, count: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..rows).collect();
    for i in 0..count.min(rows) {
        let j = i + rng.below(rows - i);
        all.swap(i, j);
    }
    all.truncate(count);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::synthetic::clustered_features;
    use crate::methods::representation::coreset::squared_distance;

    const C: usize = 24;

    #[test]
    fn probing_every_list_is_the_exhaustive_search() {
        let bank = clustered_features(900, C, 6, 1);
        let queries = clustered_features(200, C, 6, 2);
        let (exact, exact_ids) = nearest_squared(&queries, &bank, &squared_norms(&bank, C), C);
        let index = InvertedIndex::build(&bank, C, 12, 0);
        assert_eq!(index.member_ids.len(), 900);
        let (all, all_ids) = index.nearest_squared(&queries, index.lists());
        assert_eq!(all_ids, exact_ids);
        for (a, b) in all.iter().zip(&exact) {
            assert!((a - b).abs() <= 1e-4 * b.max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn fewer_probes_never_find_a_nearer_entry_and_mostly_find_the_nearest() {
        let bank = clustered_features(2000, C, 8, 3);
        let queries = clustered_features(500, C, 8, 4);
        let (exact, _) = nearest_squared(&queries, &bank, &squared_norms(&bank, C), C);
        let index = InvertedIndex::build(&bank, C, 32, 0);
        let (probed, ids) = index.nearest_squared(&queries, 4);
        let mut exact_hits = 0;
        for (q, ((&p, &e), &id)) in probed.iter().zip(&exact).zip(&ids).enumerate() {
            assert!(p >= e - 1e-3 * e.max(1.0), "a probed distance {p} below the exact {e}");
            // The distance reported is the true distance to the entry reported.
            let row = &bank[id as usize * C..(id as usize + 1) * C];
            let true_distance = squared_distance(&queries[q * C..(q + 1) * C], row);
            assert!((true_distance - p).abs() <= 1e-3 * p.max(1.0));
            exact_hits += ((p - e).abs() <= 1e-4 * e.max(1.0)) as usize;
        }
        assert!(exact_hits * 10 >= queries.len() / C * 9, "only {exact_hits} of 500 queries found their nearest entry");
    }
}
