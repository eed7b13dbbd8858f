/* The per-view operations of DINO's multi-crop with Pillow's arithmetic, on uint8 HxWx3 arrays
 * (stages/dino/augment_lean.py): crop + bicubic resize (+ mirror), ColorJitter's four operations,
 * RandomGrayscale, GaussianBlur, and the uint8 -> float normalisation by table.
 *
 * torchvision's PIL path (what the reference runs) makes a new image per operation and Pillow's
 * kernels are scalar and 4 bytes per pixel. Here the same formulas run with the same float,
 * double and fixed-point intermediates, truncations and clips, so every result equals Pillow's
 * byte for byte (tests/test_pillow_ops.py: every RGB colour for the colour operations, random boxes
 * and radii for the rest), but as table lookups (the HSV round trip) and as loops over whole lines
 * that vectorise (resize, blur). Built without -ffp-contract, so that no multiply-add is fused
 * (Pillow's x86-64 wheels fuse none).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BRIGHTNESS = 0, CONTRAST = 1, SATURATION = 2, HUE = 3 };

static inline uint8_t clip8(int v) { return v <= 0 ? 0 : v >= 255 ? 255 : (uint8_t)v; }

/* Pillow's convert("L"): ITU-R 601-2 luma in 16-bit fixed point. */
static inline uint8_t luma(const uint8_t *p) {
    return (uint8_t)((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16);
}

/* Image.blend(degenerate, image, alpha) for one byte. ImagingBlend truncates the float result,
 * after clipping it to [0, 255] when alpha lies outside [0, 1]; inside, the result lies in [0, 255]
 * already, so one clamp serves both branches (and lets the loops vectorise). */
static inline uint8_t blend(int degenerate, int value, float alpha) {
    float mixed = (float)degenerate + alpha * (float)(value - degenerate);
    mixed = mixed < 0.0f ? 0.0f : mixed;
    mixed = mixed > 255.0f ? 255.0f : mixed;
    return (uint8_t)(int)mixed;
}

static void blend_constant(uint8_t *px, Py_ssize_t n, int degenerate, float alpha) {
    uint8_t table[256];
    for (int v = 0; v < 256; v++) table[v] = blend(degenerate, v, alpha);
    for (Py_ssize_t i = 0; i < 3 * n; i++) px[i] = table[px[i]];
}

/* ImageEnhance.Contrast's degenerate level: the mean of the L image, rounded half up. */
static int mean_luma(const uint8_t *px, Py_ssize_t n) {
    int64_t sum = 0;
    for (Py_ssize_t i = 0; i < n; i++) sum += luma(px + 3 * i);
    return (int)((double)sum / (double)n + 0.5);
}

/* ImageEnhance.Color: blend with the image's own grayscale. The luma of each pixel is written
 * three times into `gray3` first, so that the blend is one flat, vectorisable loop. */
__attribute__((target_clones("avx2", "default")))
static void saturation(uint8_t *px, Py_ssize_t n, float alpha, uint8_t *gray3) {
    for (Py_ssize_t i = 0; i < n; i++) gray3[3 * i] = gray3[3 * i + 1] = gray3[3 * i + 2] = luma(px + 3 * i);
    for (Py_ssize_t i = 0; i < 3 * n; i++) px[i] = blend(gray3[i], px[i], alpha);
}

/* Pillow's rgb2hsv_row (colorsys' formulas): the hue and saturation bytes of one pixel. */
static void pillow_hue_sat(uint8_t r, uint8_t g, uint8_t b, uint8_t *hue, uint8_t *sat) {
    uint8_t maxc = r > g ? (r > b ? r : b) : (g > b ? g : b);
    uint8_t minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
    if (maxc == minc) {
        *hue = *sat = 0;
        return;
    }
    float span = (float)(maxc - minc);
    float s = span / (float)maxc;
    float rc = (float)(maxc - r) / span, gc = (float)(maxc - g) / span, bc = (float)(maxc - b) / span;
    float h;
    if (r == maxc) h = bc - gc;
    else if (g == maxc) h = 2.0 + rc - bc;
    else h = 4.0 + gc - rc;
    h = fmod(h / 6.0 + 1.0, 1.0);
    *hue = clip8((int)(h * 255.0));
    *sat = clip8((int)(s * 255.0));
}

/* Pillow's hsv2rgb, per hue byte: the sector (0-6, 6 acting as 0) and the fraction within it. */
static void pillow_sector(uint8_t hue, int *sector, float *frac) {
    *sector = (int)floor((float)hue * 6.0 / 255.0);
    *frac = (float)hue * 6.0 / 255.0 - (float)*sector;
}

/* Pillow's round() of a non-negative double, half away from zero, without a libm call:
 * x - (int)x is exact (Sterbenz's lemma for x >= 1, trivially below). */
static inline int round_nonnegative(double x) {
    int k = (int)x;
    return k + (x - k >= 0.5);
}

/* The hue round trip per pixel is a handful of table lookups; every entry is computed once, by
 * the formulas above, so the tables hold exactly Pillow's values:
 * - hue_of[branch][d1][d2]: the hue byte depends only on which channel is the maximum (r first,
 *   then g, then b, as Pillow tests them) and on the other two channels' distances below it;
 * - sat_of[maxc][minc]: the saturation byte;
 * - low[sat][val]: hsv2rgb's p = round(v (1 - s)), the sector's lowest channel;
 * - mid_scale[hue][sat]: the factor of v in the sector's middle channel (q or t), rounded per pixel;
 * - sector_of[hue]: hsv2rgb's sector (6 acting as 0);
 * - role_of[sector]: which of max (0), middle (1) and low (2) each of r, g, b gets. */
static uint8_t hue_of[3][256][256], sat_of[256][256], low[256][256], sector_of[256];
static double mid_scale[256][256];
static const uint8_t role_of[6][3] = {{0, 1, 2}, {1, 0, 2}, {2, 0, 1}, {2, 1, 0}, {1, 2, 0}, {0, 2, 1}};

static void build_hue_tables(void) {
    uint8_t unused;
    for (int d1 = 0; d1 < 256; d1++) {
        for (int d2 = 0; d2 < 256; d2++) {
            pillow_hue_sat(255, 255 - d1, 255 - d2, &hue_of[0][d1][d2], &unused);
            pillow_hue_sat(255 - d1, 255, 255 - d2, &hue_of[1][d1][d2], &unused);
            pillow_hue_sat(255 - d2, 255 - d1, 255, &hue_of[2][d1][d2], &unused);
        }
    }
    for (int maxc = 0; maxc < 256; maxc++) {
        for (int minc = 0; minc <= maxc; minc++) {
            uint8_t hue;
            pillow_hue_sat(maxc, minc, minc, &hue, &sat_of[maxc][minc]);
        }
    }
    for (int sat = 0; sat < 256; sat++) {
        float fs = (float)sat / 255.0;
        for (int val = 0; val < 256; val++) low[sat][val] = clip8((int)round((float)val * (1.0 - fs)));
        for (int hue = 0; hue < 256; hue++) {
            int sector;
            float frac;
            pillow_sector(hue, &sector, &frac);
            mid_scale[hue][sat] = sector % 2 ? 1.0 - fs * frac : 1.0 - fs * (1.0 - frac);
            sector_of[hue] = sector % 6;
        }
    }
}

static void shift_hue(uint8_t *px, Py_ssize_t n, uint8_t shift) {
    for (Py_ssize_t i = 0; i < n; i++, px += 3) {
        uint8_t r = px[0], g = px[1], b = px[2];
        uint8_t maxc = r > g ? (r > b ? r : b) : (g > b ? g : b);
        uint8_t minc = r < g ? (r < b ? r : b) : (g < b ? g : b);
        uint8_t sat = sat_of[maxc][minc];
        /* No branches on the data: selects for the max channel, and a gray pixel (sat 0) needs no
         * case of its own, since low[0][v] = v and mid_scale[h][0] = 1 give hsv2rgb's (v, v, v). */
        int branch = r == maxc ? 0 : g == maxc ? 1 : 2;
        uint8_t hue = hue_of[branch][maxc - (branch == 1 ? r : g)][maxc - (branch == 2 ? r : b)];
        hue = (uint8_t)(hue + shift);
        uint8_t value[3] = {maxc, clip8(round_nonnegative((double)maxc * mid_scale[hue][sat])), low[sat][maxc]};
        const uint8_t *role = role_of[sector_of[hue]];
        px[0] = value[role[0]];
        px[1] = value[role[1]];
        px[2] = value[role[2]];
    }
}

static void grayscale(uint8_t *px, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++, px += 3) px[0] = px[1] = px[2] = luma(px);
}

static PyObject *color_jitter(PyObject *self, PyObject *args) {
    Py_buffer view;
    const char *ops;
    Py_ssize_t n_ops;
    double factors[3];
    int hue_shift, gray;
    if (!PyArg_ParseTuple(args, "w*y#dddip", &view, &ops, &n_ops, &factors[0], &factors[1], &factors[2],
                          &hue_shift, &gray)) {
        return NULL;
    }
    if (view.len % 3 != 0 || !PyBuffer_IsContiguous(&view, 'C')) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "color_jitter: expected a C-contiguous HxWx3 uint8 buffer, got %zd bytes",
                            view.len);
    }
    for (Py_ssize_t k = 0; k < n_ops; k++) {
        if (ops[k] < BRIGHTNESS || ops[k] > HUE) {
            PyBuffer_Release(&view);
            return PyErr_Format(PyExc_ValueError, "color_jitter: unknown operation %d", (int)ops[k]);
        }
    }
    uint8_t *px = view.buf;
    Py_ssize_t n = view.len / 3;
    uint8_t *gray3 = NULL;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n_ops && n > 0 && !failed; k++) {
        /* Image.blend takes alpha as a C float; factor 1 returns the image unchanged. */
        float alpha = ops[k] == HUE ? 0.0f : (float)factors[(int)ops[k]];
        switch (ops[k]) {
            case BRIGHTNESS: if (alpha != 1.0) blend_constant(px, n, 0, alpha); break;
            case CONTRAST: if (alpha != 1.0) blend_constant(px, n, mean_luma(px, n), alpha); break;
            case SATURATION:
                if (alpha != 1.0) {
                    if (!gray3 && !(gray3 = malloc(3 * n))) {
                        failed = 1;
                        break;
                    }
                    saturation(px, n, alpha, gray3);
                }
                break;
            default: shift_hue(px, n, (uint8_t)hue_shift);
        }
    }
    if (gray && !failed) grayscale(px, n);
    Py_END_ALLOW_THREADS
    free(gray3);
    PyBuffer_Release(&view);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- Crop, bicubic resize and optional mirror: Pillow's Resample.c arithmetic ----
 *
 * Pillow resamples in two passes (horizontal then vertical, or the reverse: crop_resize), each a
 * convolution with Keys' cubic (a = -0.5) widened by the downscale factor, its taps normalised in
 * double and then rounded to 22-bit fixed point, each output rounded to 8 bits. The taps come from
 * the same double formulas here; the sums are integers, so their order is free: each pass runs as
 * "rows of taps" over whole contiguous lines (vectorised), the horizontal one on the transposed
 * crop. */
#define PRECISION_BITS (32 - 8 - 2)

static double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for in_size source pixels to out_size:
 * per output pixel its first source pixel and tap count (bounds) and ksize fixed-point taps. */
static int resample_taps(int in_size, int out_size, int **bounds_out, int32_t **taps_out) {
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    int *bounds = malloc(sizeof(int) * 2 * out_size);
    int32_t *taps = malloc(sizeof(int32_t) * ksize * out_size);
    double *weights = malloc(sizeof(double) * ksize);
    if (!bounds || !taps || !weights) {
        free(bounds); free(taps); free(weights);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, total = 0.0, inverse = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            weights[x] = bicubic((x + xmin - center + 0.5) * inverse);
            total += weights[x];
        }
        for (int x = 0; x < ksize; x++) {
            double w = x < xmax ? (total != 0.0 ? weights[x] / total : weights[x]) : 0.0;
            taps[xx * ksize + x] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
        }
        bounds[2 * xx] = xmin;
        bounds[2 * xx + 1] = xmax;
    }
    free(weights);
    *bounds_out = bounds;
    *taps_out = taps;
    return ksize;
}

/* out row j = clip8(sum_t in row (bounds[2j] + t) * taps[j][t]), rows of `len` bytes; a mirror
 * (`reverse`) writes the rows in reverse order. */
__attribute__((target_clones("avx2", "default")))
static void convolve_rows(const uint8_t *in, Py_ssize_t in_stride, uint8_t *out, Py_ssize_t out_stride,
                          Py_ssize_t len, int out_rows, int reverse, const int *bounds, const int32_t *taps,
                          int ksize, int32_t *acc) {
    for (int j = 0; j < out_rows; j++) {
        const int32_t *k = taps + (Py_ssize_t)j * ksize;
        const uint8_t *first = in + bounds[2 * j] * in_stride;
        for (Py_ssize_t i = 0; i < len; i++) acc[i] = 1 << (PRECISION_BITS - 1);
        for (int t = 0; t < bounds[2 * j + 1]; t++) {
            const uint8_t *row = first + t * in_stride;
            int32_t c = k[t];
            for (Py_ssize_t i = 0; i < len; i++) acc[i] += row[i] * c;
        }
        uint8_t *o = out + (reverse ? out_rows - 1 - j : j) * out_stride;
        for (Py_ssize_t i = 0; i < len; i++) o[i] = clip8(acc[i] >> PRECISION_BITS);
    }
}

/* (rows, cols) pixels of 3 bytes, row stride in_stride -> (cols, rows), tiled for the cache. */
static void transpose_pixels(const uint8_t *in, Py_ssize_t in_stride, int rows, int cols, uint8_t *out) {
    const int tile = 32;
    for (int r0 = 0; r0 < rows; r0 += tile) {
        for (int c0 = 0; c0 < cols; c0 += tile) {
            int r1 = r0 + tile < rows ? r0 + tile : rows, c1 = c0 + tile < cols ? c0 + tile : cols;
            for (int r = r0; r < r1; r++) {
                const uint8_t *src = in + r * in_stride + 3 * c0;
                for (int c = c0; c < c1; c++, src += 3) {
                    uint8_t *dst = out + ((Py_ssize_t)c * rows + r) * 3;
                    dst[0] = src[0]; dst[1] = src[1]; dst[2] = src[2];
                }
            }
        }
    }
}

/* The horizontal pass (and the mirror) over `rows` lines of w pixels: out is rows x size pixels.
 * Run as a pass over rows of the transposed lines, then transposed back. */
static int horizontal_pass(const uint8_t *in, Py_ssize_t stride, int rows, int w, int size, int flip,
                           const int *bounds, const int32_t *taps, int ksize, int32_t *acc, uint8_t *out) {
    Py_ssize_t column = (Py_ssize_t)3 * rows;
    uint8_t *lines_t = malloc(column * w), *out_t = malloc(column * size);
    if (!lines_t || !out_t) {
        free(lines_t); free(out_t);
        return -1;
    }
    transpose_pixels(in, stride, rows, w, lines_t);
    if (w != size) {
        convolve_rows(lines_t, column, out_t, column, column, size, flip, bounds, taps, ksize, acc);
    } else {  /* a mirror only */
        for (int c = 0; c < size; c++) memcpy(out_t + column * (flip ? size - 1 - c : c), lines_t + column * c, column);
    }
    transpose_pixels(out_t, column, size, rows, out);
    free(lines_t);
    free(out_t);
    return 0;
}

/* Crop (left, top, w, h) of an RGB image (row stride `stride`) resized to size x size into `out`,
 * mirrored left-right if `flip`: img.crop(box).resize((size, size), BICUBIC)[.transpose(FLIP)].
 * Pillow 13 runs the vertical pass first when the height shrinks by more than twice the width
 * does (ImagingResampleInner); the order changes the rounding, so it is kept. */
static int crop_resize(const uint8_t *src, Py_ssize_t stride, int left, int top, int w, int h, int size,
                       int flip, uint8_t *out) {
    int *xbounds = NULL, *ybounds = NULL;
    int32_t *xtaps = NULL, *ytaps = NULL, *acc = NULL;
    uint8_t *temp = NULL;
    int status = -1;
    const uint8_t *crop = src + top * stride + 3 * left;
    Py_ssize_t row = (Py_ssize_t)3 * size;
    int need_x = w != size || flip, need_y = h != size;
    int horizontal_first = !(h - size > 0 && h - size > 2 * (w - size));
    int xk = resample_taps(w, size, &xbounds, &xtaps), yk = resample_taps(h, size, &ybounds, &ytaps);
    int longest = (w > h ? w : h) > size ? (w > h ? w : h) : size;
    acc = malloc(sizeof(int32_t) * 3 * (Py_ssize_t)longest);
    if (xk < 0 || yk < 0 || !acc) goto done;
    if (horizontal_first) {
        /* Pillow's ybox_first / ybox_last: the crop rows the vertical pass reads. */
        int first = need_y ? ybounds[0] : 0, rows = need_y ? ybounds[2 * size - 2] + ybounds[2 * size - 1] - first : h;
        const uint8_t *lines = crop + first * stride;
        Py_ssize_t lines_stride = stride;
        if (need_x) {
            if (!(temp = malloc(row * rows))) goto done;
            if (horizontal_pass(lines, stride, rows, w, size, flip, xbounds, xtaps, xk, acc, temp)) goto done;
            lines = temp;
            lines_stride = row;
        }
        if (need_y) {
            for (int j = 0; j < size; j++) ybounds[2 * j] -= first;
            convolve_rows(lines, lines_stride, out, row, row, size, 0, ybounds, ytaps, yk, acc);
        } else {
            for (int r = 0; r < size; r++) memcpy(out + row * r, lines + r * lines_stride, row);
        }
    } else {  /* need_y holds here: h > size */
        Py_ssize_t temp_row = (Py_ssize_t)3 * w;
        if (!(temp = malloc(temp_row * size))) goto done;
        convolve_rows(crop, stride, temp, temp_row, temp_row, size, 0, ybounds, ytaps, yk, acc);
        if (need_x) {
            if (horizontal_pass(temp, temp_row, size, w, size, flip, xbounds, xtaps, xk, acc, out)) goto done;
        } else {
            memcpy(out, temp, row * size);
        }
    }
    status = 0;
done:
    free(xbounds); free(ybounds); free(xtaps); free(ytaps); free(acc); free(temp);
    return status;
}

/* ---- GaussianBlur: Pillow's BoxBlur.c arithmetic ----
 *
 * ImageFilter.GaussianBlur(radius) is three passes of an extended box filter per axis (Gwosdek et
 * al. 2011): x passes, then y passes, in 24-bit fixed point. Each pass slides along a line with an
 * integer accumulator; here every line advances at once (one vectorised loop across the lines), on
 * the transposed image for the x passes. Same integers, so the same bytes. */
#define BLUR_PASSES 3

/* Pillow's _gaussian_blur_radius: the extended box radius with the Gaussian's variance. */
static float box_radius(float radius, int passes) {
    float sigma2 = radius * radius / passes;
    float length = sqrt(12.0 * sigma2 + 1.0);
    float whole = floor((length - 1.0) / 2.0);
    float frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2);
    frac /= 6 * (sigma2 - (whole + 1) * (whole + 1));
    return whole + frac;
}

/* One pass of ImagingHorizontalBoxBlur over `n` positions of `lanes` independent bytes each. */
__attribute__((target_clones("avx2", "default")))
static void box_blur_pass(const uint8_t *in, uint8_t *out, int n, Py_ssize_t lanes, float float_radius,
                          uint32_t *acc) {
    int radius = (int)float_radius, last = n - 1;
    uint32_t ww = (uint32_t)((float)(1 << 24) / (float_radius * 2 + 1));
    uint32_t fw = ((1 << 24) - (radius * 2 + 1) * ww) / 2;
    int edge = radius + 1 < n ? radius + 1 : n;
    const uint8_t *end = in + last * lanes;
    for (Py_ssize_t i = 0; i < lanes; i++) acc[i] = in[i] * (radius + 1) + end[i] * (radius - edge + 1);
    for (int x = 0; x < edge - 1; x++) {
        const uint8_t *line = in + x * lanes;
        for (Py_ssize_t i = 0; i < lanes; i++) acc[i] += line[i];
    }
    for (int x = 0; x <= last; x++) {
        /* Pillow's three edge phases, as clamped positions. */
        int gone = x - radius - 1 > 0 ? x - radius - 1 : 0;
        int come = x + radius < last ? x + radius : last, beyond = x + radius + 1 < last ? x + radius + 1 : last;
        const uint8_t *sub = in + gone * lanes, *add = in + come * lanes, *far = in + beyond * lanes;
        uint8_t *o = out + x * lanes;
        for (Py_ssize_t i = 0; i < lanes; i++) {
            acc[i] += add[i] - sub[i];
            uint32_t bulk = acc[i] * ww + (sub[i] + far[i]) * fw;
            o[i] = (uint8_t)((bulk + (1 << 23)) >> 24);
        }
    }
}

/* ImageFilter.GaussianBlur(radius) of an h x w RGB image, in place. */
static int gaussian_blur(uint8_t *px, int h, int w, float radius) {
    float box = box_radius(radius, BLUR_PASSES);
    if (box == 0) return 0;
    Py_ssize_t bytes = (Py_ssize_t)3 * h * w;
    uint8_t *a = malloc(bytes), *b = malloc(bytes);
    uint32_t *acc = malloc(sizeof(uint32_t) * 3 * (Py_ssize_t)(h > w ? h : w));
    if (!a || !b || !acc) {
        free(a); free(b); free(acc);
        return -1;
    }
    transpose_pixels(px, 3 * w, h, w, a);  /* x passes: columns of the transposed image */
    box_blur_pass(a, b, w, 3 * h, box, acc);
    box_blur_pass(b, a, w, 3 * h, box, acc);
    box_blur_pass(a, b, w, 3 * h, box, acc);
    transpose_pixels(b, 3 * h, w, h, a);
    box_blur_pass(a, b, h, 3 * w, box, acc);  /* y passes */
    box_blur_pass(b, a, h, 3 * w, box, acc);
    box_blur_pass(a, px, h, 3 * w, box, acc);
    free(a); free(b); free(acc);
    return 0;
}

static PyObject *gaussian_blur_py(PyObject *self, PyObject *args) {
    Py_buffer view;
    int height, width;
    float radius;
    if (!PyArg_ParseTuple(args, "w*iif", &view, &height, &width, &radius)) return NULL;
    if (height <= 0 || width <= 0 || view.len != (Py_ssize_t)3 * height * width || !PyBuffer_IsContiguous(&view, 'C')) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "gaussian_blur: expected a C-contiguous %d x %d x 3 uint8 buffer", height, width);
    }
    if (!(radius >= 0)) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "gaussian_blur: radius must be >= 0");
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gaussian_blur(view.buf, height, width, radius);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *resized_crop(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    int height, width, left, top, right, bottom, size, flip;
    if (!PyArg_ParseTuple(args, "y*ii(iiii)w*ip", &src, &height, &width, &left, &top, &right, &bottom, &out,
                          &size, &flip)) {
        return NULL;
    }
    const char *error = NULL;
    if (src.len != (Py_ssize_t)3 * height * width || !PyBuffer_IsContiguous(&src, 'C')) {
        error = "the source must be a C-contiguous height x width x 3 uint8 buffer";
    } else if (left < 0 || top < 0 || right > width || bottom > height || right <= left || bottom <= top) {
        error = "the crop box must lie inside the image and be non-empty";
    } else if (size <= 0 || out.len != (Py_ssize_t)3 * size * size || !PyBuffer_IsContiguous(&out, 'C')) {
        error = "the output must be a C-contiguous size x size x 3 uint8 buffer";
    }
    int status = 0;
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        status = crop_resize(src.buf, (Py_ssize_t)3 * width, left, top, right - left, bottom - top, size, flip, out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    if (error) return PyErr_Format(PyExc_ValueError, "resized_crop: %s", error);
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* uint8 planes -> float32 through a per-plane table of 256 values (ToTensor + Normalize computed
 * once per possible byte by the caller, so each element is one lookup and equals the formula). */
static PyObject *normalize_planes(PyObject *self, PyObject *args) {
    Py_buffer src, out, table;
    Py_ssize_t plane;
    int channels;
    if (!PyArg_ParseTuple(args, "y*w*y*ni", &src, &out, &table, &plane, &channels)) return NULL;
    const char *error = NULL;
    if (!PyBuffer_IsContiguous(&src, 'C') || !PyBuffer_IsContiguous(&out, 'C') || !PyBuffer_IsContiguous(&table, 'C')) {
        error = "buffers must be C-contiguous";
    } else if (channels <= 0 || plane <= 0 || src.len % (plane * channels) != 0) {
        error = "the source must hold whole (channels, plane) items";
    } else if (out.len != (Py_ssize_t)sizeof(float) * src.len || table.len != (Py_ssize_t)sizeof(float) * 256 * channels) {
        error = "expected float32 output of the source's size and a (channels, 256) float32 table";
    }
    if (!error) {
        const uint8_t *s = src.buf;
        float *o = out.buf;
        const float *t = table.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < src.len; start += plane) {
            const float *lut = t + 256 * ((start / plane) % channels);
            for (Py_ssize_t i = start; i < start + plane; i++) o[i] = lut[s[i]];
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    PyBuffer_Release(&table);
    if (error) return PyErr_Format(PyExc_ValueError, "normalize_planes: %s", error);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"color_jitter", color_jitter, METH_VARARGS,
     "color_jitter(pixels, ops, brightness, contrast, saturation, hue_shift, gray)\n\n"
     "In place on a C-contiguous HxWx3 uint8 buffer: the operations named in `ops` (bytes of 0\n"
     "brightness, 1 contrast, 2 saturation, 3 hue) in that order, with Pillow's arithmetic, then\n"
     "grayscale if `gray`. hue_shift is added to the HSV hue byte modulo 256."},
    {"resized_crop", resized_crop, METH_VARARGS,
     "resized_crop(source, height, width, (left, top, right, bottom), out, size, flip)\n\n"
     "Pillow's img.crop(box).resize((size, size), BICUBIC), mirrored left-right if flip, from a\n"
     "C-contiguous height x width x 3 uint8 buffer into a size x size x 3 one."},
    {"gaussian_blur", gaussian_blur_py, METH_VARARGS,
     "gaussian_blur(pixels, height, width, radius)\n\n"
     "In place on a C-contiguous height x width x 3 uint8 buffer: Pillow's\n"
     "ImageFilter.GaussianBlur(radius) (three extended box passes per axis)."},
    {"normalize_planes", normalize_planes, METH_VARARGS,
     "normalize_planes(source, out, table, plane, channels)\n\n"
     "out[i] = table[channel of i][source[i]] for C-contiguous uint8 (N, channels, plane) source\n"
     "and float32 out, with a (channels, 256) float32 table."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pillow_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pillow_ops(void) {
    build_hue_tables();
    return PyModule_Create(&module);
}
