/* image_io: 8-bit RGB/RGBA images from and to binary PPM (P6) and PNG files (libpng), and a generated pattern. */
#ifndef TAKDSR_IMAGE_IO_H
#define TAKDSR_IMAGE_IO_H

#include <stdbool.h>
#include <stdint.h>

typedef struct image {
    uint32_t width, height, channels; /* channels: 3 (RGB) or 4 (RGBA) */
    uint8_t *pixels;                  /* rows top first, pixels left to right, no padding */
} image;

/* Whether the name ends in .png or .ppm, in any case: the only files image_load and image_save handle. */
bool image_name_ok(const char *path);
/* Loads a .ppm (P6, maxval 255) or .png file (any PNG: converted to 8-bit RGB, alpha dropped, 16-bit samples rounded
 * to 8 bits, gAMA ignored). 0 on success, -1 with a message on stderr. */
int image_load(const char *path, image *img);
/* The size a .png or .ppm file's header declares, read without decoding it (so a daemon may refuse it first). 0 on
 * success, -1 with a message on stderr. */
int image_size(const char *path, uint32_t *width, uint32_t *height);
/* Saves as .ppm (RGB only: alpha is dropped) or .png (RGB or RGBA), chosen by the file name's extension. */
int image_save(const char *path, const image *img);
/* A deterministic test pattern: gradients, a checkerboard and (channels 4) a varying alpha. */
int image_pattern(uint32_t width, uint32_t height, uint32_t channels, image *img);
void image_free(image *img);

#endif
