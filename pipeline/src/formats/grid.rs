//! Sample grids: square uint8 RGB images in cells on a white background, written as PNG. Used by
//! `pipeline sample` and by the EMA sample grids `pipeline train` writes every `train.sample_every` steps.

use image::ImageEncoder;

/// Pixels between grid cells (and at the border).
pub const GRID_PAD: usize = 2;

pub struct Grid {
    cols: usize,
    cells: usize,
    size: usize,
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Grid {
    /// Room for `n` cells of `size`² pixels in `cols` columns (default ⌈√n⌉).
    pub fn new(n: usize, cols: Option<usize>, size: usize) -> Grid {
        let (cols, _, width, height) = grid_shape(n, cols, size);
        Grid {
            cols,
            cells: n,
            size,
            width,
            height,
            pixels: vec![255u8; width * height * 3],
        }
    }

    /// Puts image `index` (size×size×3 bytes); indices beyond the grid are ignored.
    pub fn put(&mut self, index: usize, image: &[u8]) {
        if index >= self.cells {
            return;
        }
        let s = self.size;
        let (gx, gy) = (
            GRID_PAD + (index % self.cols) * (s + GRID_PAD),
            GRID_PAD + (index / self.cols) * (s + GRID_PAD),
        );
        for row in 0..s {
            let dst = ((gy + row) * self.width + gx) * 3;
            self.pixels[dst..dst + s * 3].copy_from_slice(&image[row * s * 3..(row + 1) * s * 3]);
        }
    }

    pub fn png(&self) -> anyhow::Result<Vec<u8>> {
        encode_png(&self.pixels, self.width, self.height)
    }
}

pub fn encode_png(image: &[u8], width: usize, height: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(
        image,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// Grid geometry: (columns, rows, width, height) for `n` cells of `size`² pixels.
pub fn grid_shape(n: usize, cols: Option<usize>, size: usize) -> (usize, usize, usize, usize) {
    let cols = cols
        .unwrap_or_else(|| (n as f64).sqrt().ceil() as usize)
        .clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    (
        cols,
        rows,
        cols * size + (cols + 1) * GRID_PAD,
        rows * size + (rows + 1) * GRID_PAD,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_shape_pads_every_cell() {
        assert_eq!(
            grid_shape(10, None, 16),
            (4, 3, 4 * 16 + 5 * GRID_PAD, 3 * 16 + 4 * GRID_PAD)
        );
        assert_eq!(grid_shape(3, Some(8), 8).0, 3);
    }

    #[test]
    fn put_places_a_cell_after_the_padding() {
        let mut g = Grid::new(2, None, 2);
        g.put(1, &[7u8; 12]);
        g.put(5, &[9u8; 12]);
        let at = |x: usize, y: usize| g.pixels[(y * g.width + x) * 3];
        assert_eq!(at(GRID_PAD + 2 + GRID_PAD, GRID_PAD), 7);
        assert_eq!(at(GRID_PAD, GRID_PAD), 255);
        assert!(!g.pixels.contains(&9));
    }
}
