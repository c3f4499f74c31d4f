// Views of the strided tensors the kernels read and write: a pointer and its strides, with the
// address arithmetic written once (host and device).
//
// Every tensor of the params structs is one of these. Strides are in elements, never bytes;
// the last (feature) dimension is always contiguous. A view does not own its memory. Its
// element type is what the pointer points to: the params structs hold type-erased views
// (StridedView<const void>, the dtype field says what is stored), which a kernel turns into a
// typed one with as<T>() before it forms an address.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lminf/host_device.h"

namespace lminf {

// Rows of a matrix [rows, features]: row r starts at data + r * row_stride. Also what
// StridedView::rows gives, the rows of one (sequence, head).
template <class T>
struct RowsView {
  T* data = nullptr;       // row 0
  int64_t row_stride = 0;  // elements from one row to the next

  // Row r's first element (typed views only).
  LMINF_HOST_DEVICE T* row(int64_t r) const {
    static_assert(!std::is_void_v<T>, "type the view first (StridedView::as)");
    return data + r * row_stride;
  }
  // The same view with elements of type E (E const where T is).
  template <class E>
  LMINF_HOST_DEVICE RowsView<E> as() const {
    return {static_cast<E*>(data), row_stride};
  }
  // A typed view passes where a type-erased (or const) one is asked for.
  template <class U, class = std::enable_if_t<std::is_convertible_v<T*, U*>>>
  LMINF_HOST_DEVICE operator RowsView<U>() const {
    return {data, row_stride};
  }
};

// A [batch, heads, rows, features] tensor: row t of head h of sequence b starts at
// data + b * batch_stride + h * head_stride + t * row_stride. A stride may be 0 (one
// sequence's or head's rows shared by all: a broadcast input).
template <class T>
struct StridedView {
  T* data = nullptr;          // row 0 of head 0 of sequence 0
  int64_t batch_stride = 0;   // elements from one sequence to the next
  int64_t head_stride = 0;    // elements from one head to the next
  int64_t row_stride = 0;     // elements from one row (token, or cache slot) to the next

  // Elements from data to row t of head h of sequence b.
  LMINF_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t t) const {
    return b * batch_stride + h * head_stride + t * row_stride;
  }
  // Row t of head h of sequence b (typed views only).
  LMINF_HOST_DEVICE T* at(int64_t b, int64_t h, int64_t t) const {
    static_assert(!std::is_void_v<T>, "type the view first (StridedView::as)");
    return data + offset(b, h, t);
  }
  // The rows of head h of sequence b (typed views only).
  LMINF_HOST_DEVICE RowsView<T> rows(int64_t b, int64_t h) const {
    return {at(b, h, 0), row_stride};
  }
  // The same view with elements of type E (E const where T is).
  template <class E>
  LMINF_HOST_DEVICE StridedView<E> as() const {
    return {static_cast<E*>(data), batch_stride, head_stride, row_stride};
  }
  // A typed view passes where a type-erased (or const) one is asked for.
  template <class U, class = std::enable_if_t<std::is_convertible_v<T*, U*>>>
  LMINF_HOST_DEVICE operator StridedView<U>() const {
    return {data, batch_stride, head_stride, row_stride};
  }
};

// A dense (row-major, contiguous) [batch, heads, rows, features] tensor at data.
template <class T>
LMINF_HOST_DEVICE StridedView<T> dense_view(T* data, int64_t heads, int64_t rows,
                                            int64_t features) {
  return {data, heads * rows * features, rows * features, features};
}

// One row (or one value) per sequence of a batch, or one shared by all: sequence b's row
// starts at data + b * batch_stride, so batch_stride 0 gives every sequence row 0. The slot
// positions of a cache and the positions of a chunk's first rows are laid out so.
template <class T>
struct PerSequence {
  T* data = nullptr;
  int64_t batch_stride = 0;  // elements from one sequence's row to the next; 0: shared

  // Sequence b's row.
  LMINF_HOST_DEVICE T* of(int64_t b) const { return data + b * batch_stride; }
};

}  // namespace lminf
