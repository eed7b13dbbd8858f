/* Exact k-nearest-neighbour selection from a low-precision candidate pass (stages/knn_bf16.py).
 *
 * The caller computes every query-item inner product in bf16 (AMX) and knows a bound `margin` on
 * twice the error of each such score. Per query row:
 *   candidates(): L = the k-th largest of the row's block maxima (so at least k items score >= L
 *     in bf16, and the exact k-th best score is >= L - margin / 2); every item whose bf16 score is
 *     >= L - margin is a candidate, and no other item can be among the exact k best;
 *   rerank(): the candidates' exact float32 inner products, the k best kept in order (ties to the
 *     lower item index, as faiss and a stable sort do).
 * Rows with more candidates than the caller's capacity get count -1 (the caller searches them
 * another way).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Order-preserving unsigned key of a bf16 (larger key = larger value), so that block maxima are
 * integer maxima and vectorise. */
static inline uint16_t bf16_key(uint16_t bits) { return bits & 0x8000 ? (uint16_t)~bits : (uint16_t)(bits | 0x8000); }
static inline float key_to_float(uint16_t key) { return bf16_to_float(key & 0x8000 ? (uint16_t)(key & 0x7fff) : (uint16_t)~key); }

__attribute__((target_clones("avx2", "default")))
static void block_maxima(const uint16_t *row, Py_ssize_t n, uint16_t *maxima) {
    Py_ssize_t blocks = n / BLOCK;
    for (Py_ssize_t b = 0; b < blocks; b++) {
        uint16_t best = 0;
        for (int i = 0; i < BLOCK; i++) {
            uint16_t key = bf16_key(row[b * BLOCK + i]);
            best = key > best ? key : best;
        }
        maxima[b] = best;
    }
    if (n % BLOCK) {
        uint16_t best = 0;
        for (Py_ssize_t i = blocks * BLOCK; i < n; i++) {
            uint16_t key = bf16_key(row[i]);
            best = key > best ? key : best;
        }
        maxima[blocks] = best;
    }
}

/* The k-th largest of values[0..count) (count >= k), by insertion into a sorted array of k. */
static uint16_t kth_largest(const uint16_t *values, Py_ssize_t count, int k, uint16_t *top) {
    int filled = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        uint16_t v = values[i];
        if (filled == k && v <= top[k - 1]) continue;
        int j = filled < k ? filled++ : k - 1;
        while (j > 0 && top[j - 1] < v) {
            top[j] = top[j - 1];
            j--;
        }
        top[j] = v;
    }
    return top[k - 1];
}

static PyObject *candidates(PyObject *self, PyObject *args) {
    Py_buffer scores, indices, counts;
    Py_ssize_t rows, n;
    int k;
    double margin;
    if (!PyArg_ParseTuple(args, "y*nnidw*w*", &scores, &rows, &n, &k, &margin, &indices, &counts)) return NULL;
    const char *error = NULL;
    Py_ssize_t capacity = rows > 0 ? indices.len / (Py_ssize_t)sizeof(int32_t) / rows : 0;
    if (rows <= 0 || n <= 0 || k <= 0 || k > n || !(margin >= 0)) {
        error = "need rows, n >= 1, 1 <= k <= n and margin >= 0";
    } else if (scores.len != rows * n * 2 || counts.len != rows * (Py_ssize_t)sizeof(int32_t) || capacity < k) {
        error = "expected (rows, n) bf16 scores, (rows,) int32 counts and (rows, capacity >= k) int32 indices";
    } else if (!PyBuffer_IsContiguous(&scores, 'C') || !PyBuffer_IsContiguous(&indices, 'C') || !PyBuffer_IsContiguous(&counts, 'C')) {
        error = "buffers must be C-contiguous";
    }
    uint16_t *maxima = NULL, *top = NULL;
    if (!error) {
        Py_ssize_t blocks = (n + BLOCK - 1) / BLOCK;
        maxima = malloc(sizeof(uint16_t) * blocks);
        top = malloc(sizeof(uint16_t) * k);
        if (!maxima || !top) {
            free(maxima); free(top);
            PyBuffer_Release(&scores); PyBuffer_Release(&indices); PyBuffer_Release(&counts);
            return PyErr_NoMemory();
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint16_t *row = (const uint16_t *)scores.buf + r * n;
            int32_t *found = (int32_t *)indices.buf + r * capacity;
            block_maxima(row, n, maxima);
            /* Fewer blocks than k: every item is a candidate. */
            float threshold = blocks < k ? -INFINITY : key_to_float(kth_largest(maxima, blocks, k, top)) - (float)margin;
            Py_ssize_t count = 0;
            for (Py_ssize_t b = 0; b < blocks && count <= capacity; b++) {
                if (key_to_float(maxima[b]) < threshold) continue;
                Py_ssize_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
                for (Py_ssize_t i = b * BLOCK; i < end; i++) {
                    if (bf16_to_float(row[i]) >= threshold) {
                        if (count < capacity) found[count] = (int32_t)i;
                        count++;
                    }
                }
            }
            ((int32_t *)counts.buf)[r] = count > capacity ? -1 : (int32_t)count;
        }
        Py_END_ALLOW_THREADS
    }
    free(maxima);
    free(top);
    PyBuffer_Release(&scores);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&counts);
    if (error) return PyErr_Format(PyExc_ValueError, "candidates: %s", error);
    Py_RETURN_NONE;
}

__attribute__((target_clones("avx2", "default")))
static float dot(const float *a, const float *b, Py_ssize_t d) {
    float lanes[16] = {0};
    Py_ssize_t i = 0;
    for (; i + 16 <= d; i += 16) {
        for (int j = 0; j < 16; j++) lanes[j] += a[i + j] * b[i + j];
    }
    float total = 0.0f;
    for (int j = 0; j < 16; j++) total += lanes[j];
    for (; i < d; i++) total += a[i] * b[i];
    return total;
}

static PyObject *rerank(PyObject *self, PyObject *args) {
    Py_buffer queries, train, indices, counts, out_scores, out_indices;
    Py_ssize_t rows, n, d;
    int k;
    if (!PyArg_ParseTuple(args, "y*y*y*y*nnniw*w*", &queries, &train, &indices, &counts, &rows, &n, &d, &k,
                          &out_scores, &out_indices)) {
        return NULL;
    }
    const char *error = NULL;
    Py_ssize_t capacity = rows > 0 ? indices.len / (Py_ssize_t)sizeof(int32_t) / rows : 0;
    if (rows <= 0 || n <= 0 || d <= 0 || k <= 0 || k > n) {
        error = "need rows, n, d >= 1 and 1 <= k <= n";
    } else if (queries.len != rows * d * 4 || train.len != n * d * 4 || counts.len != rows * 4 || capacity < k ||
               out_scores.len != rows * k * 4 || out_indices.len != rows * k * 8) {
        error = "expected float32 (rows, d) queries and (n, d) train, int32 counts and indices, "
                "float32 and int64 (rows, k) outputs";
    }
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t r = 0; r < rows; r++) {
            int32_t count = ((const int32_t *)counts.buf)[r];
            const int32_t *found = (const int32_t *)indices.buf + r * capacity;
            const float *q = (const float *)queries.buf + r * d;
            float *best = (float *)out_scores.buf + r * k;
            int64_t *best_index = (int64_t *)out_indices.buf + r * k;
            int filled = 0;
            /* Candidates arrive in increasing index order, so "strictly better" keeps ties in index order. */
            for (int32_t c = 0; c < count; c++) {
                int32_t item = found[c];
                float s = dot(q, (const float *)train.buf + (Py_ssize_t)item * d, d);
                if (filled == k && !(s > best[k - 1])) continue;
                int j = filled < k ? filled++ : k - 1;
                while (j > 0 && best[j - 1] < s) {
                    best[j] = best[j - 1];
                    best_index[j] = best_index[j - 1];
                    j--;
                }
                best[j] = s;
                best_index[j] = item;
            }
            for (int j = filled; j < k; j++) {  /* rows the caller searches otherwise (count -1) */
                best[j] = -INFINITY;
                best_index[j] = -1;
            }
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&queries); PyBuffer_Release(&train); PyBuffer_Release(&indices);
    PyBuffer_Release(&counts); PyBuffer_Release(&out_scores); PyBuffer_Release(&out_indices);
    if (error) return PyErr_Format(PyExc_ValueError, "rerank: %s", error);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"candidates", candidates, METH_VARARGS,
     "candidates(scores, rows, n, k, margin, indices, counts)\n\n"
     "Per row of C-contiguous (rows, n) bf16 scores (as 16-bit integers): the items whose score is\n"
     ">= (k-th largest block maximum) - margin, in index order, into (rows, capacity) int32 indices;\n"
     "counts[row] = their number, or -1 when it exceeds the capacity."},
    {"rerank", rerank, METH_VARARGS,
     "rerank(queries, train, indices, counts, rows, n, d, k, out_scores, out_indices)\n\n"
     "The k best candidates of each row by exact float32 inner product, best first (ties to the\n"
     "lower index), into (rows, k) float32 scores and int64 indices."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_knn_select", NULL, -1, methods};

PyMODINIT_FUNC PyInit__knn_select(void) { return PyModule_Create(&module); }
