// First-fit-decreasing bin packing for sequence packing (aligner._C).
//
// Items are sorted by decreasing length (stable: equal lengths keep their input order),
// then each item goes into the leftmost bin whose remaining capacity still holds it.
// A max segment tree over the remaining capacity of every bin answers "leftmost bin with
// remaining >= len" in O(log B); bins that are not opened yet hold the full capacity, so
// the leftmost unopened leaf is exactly "open a new bin". Total O(n log n).
//
// aligner/data/packing.py holds a pure-Python implementation of the same algorithm; the
// two must return identical assignments (tests/data/test_packing.py checks it).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

// Upper bound on the number of bins first fit can open: at most one bin ends up at most
// half full, so bins <= 2 * ceil(total / capacity) + 1 (and never more than n).
int64_t max_bins(const std::vector<int64_t>& lengths, int64_t capacity) {
  int64_t total = 0;
  for (int64_t len : lengths) total += len;
  int64_t bound = 2 * ((total + capacity - 1) / capacity) + 2;
  return std::max<int64_t>(1, std::min<int64_t>(bound, static_cast<int64_t>(lengths.size())));
}

// Order of items by decreasing length, ties by increasing index (a stable counting sort,
// since 1 <= length <= capacity).
std::vector<int64_t> decreasing_order(const std::vector<int64_t>& lengths, int64_t capacity) {
  std::vector<int64_t> count(static_cast<size_t>(capacity) + 2, 0);
  for (int64_t len : lengths) count[static_cast<size_t>(capacity - len)]++;
  int64_t run = 0;
  for (auto& c : count) {
    int64_t next = run + c;
    c = run;
    run = next;
  }
  std::vector<int64_t> order(lengths.size());
  for (size_t i = 0; i < lengths.size(); ++i) {
    order[static_cast<size_t>(count[static_cast<size_t>(capacity - lengths[i])]++)] = static_cast<int64_t>(i);
  }
  return order;
}

std::tuple<py::array_t<int64_t>, py::array_t<int64_t>, py::array_t<int64_t>> ffd_pack(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_in, int64_t capacity) {
  if (capacity <= 0) throw std::invalid_argument("capacity must be positive, got " + std::to_string(capacity));
  if (lengths_in.ndim() != 1) throw std::invalid_argument("lengths must be a 1-D array");
  const int64_t n = lengths_in.shape(0);
  std::vector<int64_t> lengths(lengths_in.data(), lengths_in.data() + n);
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0 || lengths[i] > capacity) {
      throw std::invalid_argument("item " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                  ", expected 1.." + std::to_string(capacity));
    }
  }
  py::array_t<int64_t> bin_of_arr(n);
  auto bin_of = bin_of_arr.mutable_unchecked<1>();
  int64_t num_bins = 0;
  std::vector<int64_t> order;
  {
    py::gil_scoped_release release;
    order = decreasing_order(lengths, capacity);
    int64_t size = 1;
    const int64_t bins_bound = n > 0 ? max_bins(lengths, capacity) : 1;
    while (size < bins_bound) size <<= 1;
    // tree[1] is the root, leaves are tree[size + b] = remaining capacity of bin b.
    std::vector<int64_t> tree(2 * static_cast<size_t>(size), capacity);
    for (int64_t item : order) {
      const int64_t len = lengths[static_cast<size_t>(item)];
      if (tree[1] < len) throw std::logic_error("packing tree exhausted (bin bound violated)");
      int64_t node = 1;
      while (node < size) {
        node <<= 1;
        if (tree[static_cast<size_t>(node)] < len) node |= 1;
      }
      const int64_t bin = node - size;
      bin_of(item) = bin;
      if (bin + 1 > num_bins) num_bins = bin + 1;
      tree[static_cast<size_t>(node)] -= len;
      for (node >>= 1; node >= 1; node >>= 1) {
        tree[static_cast<size_t>(node)] =
            std::max(tree[static_cast<size_t>(2 * node)], tree[static_cast<size_t>(2 * node + 1)]);
      }
    }
  }
  // Group the items by bin, in the order they were placed (CSR layout).
  py::array_t<int64_t> offsets_arr(num_bins + 1);
  py::array_t<int64_t> members_arr(n);
  auto offsets = offsets_arr.mutable_unchecked<1>();
  auto members = members_arr.mutable_unchecked<1>();
  for (int64_t b = 0; b <= num_bins; ++b) offsets(b) = 0;
  for (int64_t i = 0; i < n; ++i) offsets(bin_of(i) + 1)++;
  for (int64_t b = 0; b < num_bins; ++b) offsets(b + 1) += offsets(b);
  std::vector<int64_t> fill(static_cast<size_t>(num_bins), 0);
  for (int64_t item : order) {
    const int64_t b = bin_of(item);
    members(offsets(b) + fill[static_cast<size_t>(b)]++) = item;
  }
  return {bin_of_arr, members_arr, offsets_arr};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "aligner native kernels: sequence packing";
  m.def("ffd_pack", &ffd_pack, py::arg("lengths"), py::arg("capacity"),
        "First-fit-decreasing packing of item lengths into bins of `capacity`.\n"
        "Returns (bin_of [n], members [n], offsets [num_bins + 1]): members[offsets[b]:offsets[b+1]]\n"
        "are the item indices in bin b, in placement order.");
}
