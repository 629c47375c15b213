//! The anomaly-map overlay as an egui_wgpu paint callback: score maps and ground-truth masks are uploaded once per
//! image as GPU textures and coloured, thresholded and outlined by `heatmap.wgsl` on every frame, so dragging the
//! threshold or the opacity costs one uniform write.

use eframe::egui;
use eframe::egui_wgpu::{self, wgpu, CallbackResources, CallbackTrait};
use loupe_engine::maps::ScoreMap;
use std::collections::HashMap;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// GPU copies kept for recently shown images.
const CACHED_OVERLAYS: usize = 24;
/// Masks are stored at most this large: the outline is drawn where the mask's coverage crosses one half, and a
/// mask much finer than the screen would alias into broken lines when minified (the shader samples one level).
const MAX_MASK_SIDE: u32 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Colormap {
    #[default]
    Jet,
    Inferno,
    Turbo,
}

impl Colormap {
    pub const ALL: [Colormap; 3] = [Colormap::Jet, Colormap::Inferno, Colormap::Turbo];

    pub fn name(self) -> &'static str {
        match self {
            Colormap::Jet => "jet",
            Colormap::Inferno => "inferno",
            Colormap::Turbo => "turbo",
        }
    }
}

/// How one overlay is drawn this frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverlayStyle {
    pub threshold: f32,
    /// Scores mapped to the two ends of the colormap.
    pub range: (f32, f32),
    pub opacity: f32,
    pub colormap: Colormap,
    pub contour: bool,
    pub mask_outline: bool,
    /// Pixels scoring below the threshold show the plain image.
    pub hide_below_threshold: bool,
}

/// A ground-truth mask, nonzero = defect.
pub struct MaskImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl MaskImage {
    /// From a mask image (nonzero = defect), as coverage in 0..=255, area-averaged down to `MAX_MASK_SIDE`.
    pub fn from_gray(image: image::GrayImage) -> Self {
        let binary = image::GrayImage::from_fn(image.width(), image.height(), |x, y| {
            image::Luma([if image.get_pixel(x, y).0[0] > 0 { 255 } else { 0 }])
        });
        let (width, height) = binary.dimensions();
        let scale = (MAX_MASK_SIDE as f32 / width.max(height) as f32).min(1.0);
        let binary = if scale < 1.0 {
            let (w, h) =
                (((width as f32 * scale).round() as u32).max(1), ((height as f32 * scale).round() as u32).max(1));
            image::imageops::resize(&binary, w, h, image::imageops::FilterType::Triangle)
        } else {
            binary
        };
        let (width, height) = binary.dimensions();
        Self { width, height, pixels: binary.into_raw() }
    }
}

/// What is uploaded for one image; `key` identifies it across frames.
#[derive(Clone)]
pub struct OverlayData {
    pub key: u64,
    pub map: Arc<ScoreMap>,
    pub mask: Option<Arc<MaskImage>>,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Uniforms {
    params: [f32; 4],
    flags: [f32; 4],
    uv_rect: [f32; 4],
}

struct GpuOverlay {
    bind_group: wgpu::BindGroup,
    uniforms: wgpu::Buffer,
    last_used: u64,
}

/// Lives in egui_wgpu's callback resources.
pub struct HeatmapRenderer {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    overlays: HashMap<u64, GpuOverlay>,
    frame: u64,
}

/// Creates the pipeline once; the inspector draws nothing of its own until this ran.
pub fn install(render_state: &egui_wgpu::RenderState) {
    let device = &render_state.device;
    let shader = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("loupe heatmap"),
        source: wgpu::ShaderSource::Wgsl(include_str!("heatmap.wgsl").into()),
    });
    let texture_entry = |binding| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            sample_type: wgpu::TextureSampleType::Float { filterable: false },
            view_dimension: wgpu::TextureViewDimension::D2,
            multisampled: false,
        },
        count: None,
    };
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("loupe heatmap"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::VERTEX_FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            },
            texture_entry(1),
            texture_entry(2),
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("loupe heatmap"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("loupe heatmap"),
        layout: Some(&pipeline_layout),
        vertex: wgpu::VertexState {
            module: &shader,
            entry_point: Some("vs_main"),
            buffers: &[],
            compilation_options: Default::default(),
        },
        fragment: Some(wgpu::FragmentState {
            module: &shader,
            entry_point: Some("fs_main"),
            targets: &[Some(wgpu::ColorTargetState {
                format: render_state.target_format,
                blend: Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING),
                write_mask: wgpu::ColorWrites::ALL,
            })],
            compilation_options: Default::default(),
        }),
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        multiview_mask: None,
        cache: None,
    });
    render_state.renderer.write().callback_resources.insert(HeatmapRenderer {
        pipeline,
        layout,
        overlays: HashMap::new(),
        frame: 0,
    });
}

fn single_channel_texture(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    size: (u32, u32),
    format: wgpu::TextureFormat,
    bytes: &[u8],
) -> wgpu::TextureView {
    let texture = device.create_texture_with_data(
        queue,
        &wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d { width: size.0, height: size.1, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING,
            view_formats: &[],
        },
        wgpu::util::TextureDataOrder::LayerMajor,
        bytes,
    );
    texture.create_view(&wgpu::TextureViewDescriptor::default())
}

impl HeatmapRenderer {
    fn upload(&mut self, device: &wgpu::Device, queue: &wgpu::Queue, data: &OverlayData) {
        let map = &data.map;
        let scores = single_channel_texture(
            device,
            queue,
            "loupe scores",
            (map.width as u32, map.height as u32),
            wgpu::TextureFormat::R32Float,
            bytemuck::cast_slice(&map.data),
        );
        let empty = MaskImage { width: 1, height: 1, pixels: vec![0] };
        let mask_image = data.mask.as_deref().unwrap_or(&empty);
        let mask = single_channel_texture(
            device,
            queue,
            "loupe mask",
            (mask_image.width, mask_image.height),
            wgpu::TextureFormat::R8Unorm,
            &mask_image.pixels,
        );
        let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("loupe heatmap uniforms"),
            size: std::mem::size_of::<Uniforms>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("loupe heatmap"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: uniforms.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: wgpu::BindingResource::TextureView(&scores) },
                wgpu::BindGroupEntry { binding: 2, resource: wgpu::BindingResource::TextureView(&mask) },
            ],
        });
        if self.overlays.len() >= CACHED_OVERLAYS {
            if let Some(oldest) = self.overlays.iter().min_by_key(|(_, o)| o.last_used).map(|(k, _)| *k) {
                self.overlays.remove(&oldest);
            }
        }
        self.overlays.insert(data.key, GpuOverlay { bind_group, uniforms, last_used: self.frame });
    }
}

struct OverlayCallback {
    data: OverlayData,
    uniforms: Uniforms,
}

impl CallbackTrait for OverlayCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(renderer) = resources.get_mut::<HeatmapRenderer>() else { return Vec::new() };
        renderer.frame += 1;
        if !renderer.overlays.contains_key(&self.data.key) {
            renderer.upload(device, queue, &self.data);
        }
        let frame = renderer.frame;
        if let Some(overlay) = renderer.overlays.get_mut(&self.data.key) {
            overlay.last_used = frame;
            queue.write_buffer(&overlay.uniforms, 0, bytemuck::bytes_of(&self.uniforms));
        }
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &CallbackResources,
    ) {
        let Some(renderer) = resources.get::<HeatmapRenderer>() else { return };
        let Some(overlay) = renderer.overlays.get(&self.data.key) else { return };
        render_pass.set_pipeline(&renderer.pipeline);
        render_pass.set_bind_group(0, &overlay.bind_group, &[]);
        render_pass.draw(0..6, 0..1);
    }
}

/// Paints the overlay of `data` over `rect`, which shows the `uv` part of the image.
pub fn paint_overlay(
    painter: &egui::Painter,
    rect: egui::Rect,
    uv: egui::Rect,
    data: &OverlayData,
    style: &OverlayStyle,
) {
    if rect.width() < 1.0 || rect.height() < 1.0 {
        return;
    }
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let colormap = match style.colormap {
        Colormap::Jet => 0.0,
        Colormap::Inferno => 1.0,
        Colormap::Turbo => 2.0,
    };
    let uniforms = Uniforms {
        params: [style.threshold, style.range.0, style.range.1, style.opacity],
        flags: [
            colormap,
            flag(style.contour),
            flag(style.mask_outline && data.mask.is_some()),
            flag(style.hide_below_threshold),
        ],
        uv_rect: [uv.min.x, uv.min.y, uv.max.x, uv.max.y],
    };
    painter.add(egui_wgpu::Callback::new_paint_callback(rect, OverlayCallback { data: data.clone(), uniforms }));
}
